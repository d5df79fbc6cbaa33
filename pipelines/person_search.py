"""The person-search pipeline as a Kubeflow Pipelines v2 DAG.

    tracking ─────────────────┐
    dataset_digest ─► ingest ─┴─► pretrain ─► train ─► extract × N shards (ParallelFor) ─► extract_merge (Collected)
                                                                                │
             promote ◄── dsl.If(beats champion) ◄── register ◄── evaluate ◄─────┤
                                                                    index ◄─────┘

    all of the above inside dsl.ExitHandler ─► close_runs (ends the MLflow runs, always)

Pipeline parameters (defaults taken from params.yaml when compiled):
  dataset_root  where the raw dataset is; in the cluster, a path under the dataset PVC's mount
  params_json   every params.yaml section except `pipeline`, as JSON (JSON, not a dict
                parameter, because KFP refuses nulls in dict parameters and params.yaml has some)

pretrain.enabled is read when compiling too: false leaves the pretrain task out.
pipeline.train_nodes > 1 replaces `train` by `train_nodes`, which runs the same training
as a Kubeflow Trainer TrainJob of several nodes (pipelines.trainjob, components.trainjob).
Compile-time settings (the `pipeline` section: images, resources, PVC, Secret, GPU
placement, number of extraction shards) shape the DAG itself; see
pipelines.settings. `build_pipeline` returns the @dsl.pipeline function;
`psearch pipeline compile` (pipelines.compile) writes it to pipelines/person_search.yaml.

Hardening for a real cluster (issue #15): the PVC readers' cache is keyed on the
dataset's digest; pretrain/train are retried with a timeout and keep their
checkpoints on the checkpoint PVC, so a retry resumes; every task has an image
pull policy (images pinned by digest when the settings give one); GPU tasks get a
memory-backed /dev/shm. kfp-kubernetes 2.17 cannot mount a PVC read-only (its
PvcMount has no such field): the dataset volume must be read-only itself.

Only kfp-kubernetes and resource settings are cluster-specific; kfp.local ignores
them without error (checked in tests/test_pipeline_local.py), so `psearch pipeline
run-local` runs this very DAG, passing a local dataset_root instead of the PVC.
"""

import json

from kfp import dsl, kubernetes

from components import MODULES, build_components
from pipelines.settings import PipelineSettings
from pipelines.trainjob import trainjob_template

# The memory-backed emptyDir mounted over /dev/shm in GPU tasks.
SHM_VOLUME = "dshm"
# Back-off before a retried training task starts again (doubling each time).
TRAIN_BACKOFF = "300s"


def _resources(task: dsl.PipelineTask, stage: str, settings: PipelineSettings) -> None:
    res = settings.resources[stage]
    task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
    if res.timeout_hours:
        kubernetes.set_timeout(task, round(res.timeout_hours * 3600))
    if res.gpus:
        # DataLoader workers hand batches over through /dev/shm; a pod gets 64 MiB by default.
        kubernetes.empty_dir_mount(
            task,
            volume_name=SHM_VOLUME,
            mount_path="/dev/shm",
            medium="Memory",
            size_limit=settings.shm_size,
        )
        task.set_accelerator_type(settings.gpu_resource).set_accelerator_limit(res.gpus)
        # GPU nodes are usually labelled and tainted so that only GPU work lands there.
        for key, value in settings.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for tol in settings.gpu_tolerations:
            kubernetes.add_toleration(
                task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect
            )


def _credentials(task: dsl.PipelineTask, settings: PipelineSettings) -> None:
    """MLflow and S3 credentials from the Kubernetes Secret, never literals in the spec."""
    required = {key: key for key in settings.secret_required}
    optional = {key: key for key in settings.secret_optional}
    if required:
        kubernetes.use_secret_as_env(task, secret_name=settings.secret, secret_key_to_env=required)
    if optional:
        # A key missing from the Secret leaves the variable unset instead of blocking the pod.
        kubernetes.use_secret_as_env(
            task, secret_name=settings.secret, secret_key_to_env=optional, optional=True
        )


def _dataset(task: dsl.PipelineTask, settings: PipelineSettings) -> None:
    """The raw images, read by every stage that opens them (manifests store paths under it).
    Writable as far as KFP goes: mount_pvc has no read-only option (see docs/kubeflow.md)."""
    kubernetes.mount_pvc(task, pvc_name=settings.dataset_pvc, mount_path=settings.dataset_mount)


def _training(task: dsl.PipelineTask, settings: PipelineSettings) -> None:
    """A preempted GPU node fails the task; the retry resumes from the checkpoint PVC."""
    if settings.checkpoint_pvc:
        kubernetes.mount_pvc(
            task, pvc_name=settings.checkpoint_pvc, mount_path=settings.checkpoint_mount
        )
    if settings.train_retries:
        task.set_retry(
            num_retries=settings.train_retries, backoff_duration=TRAIN_BACKOFF, backoff_factor=2.0
        )


def _configure(
    task: dsl.PipelineTask,
    stage: str,
    settings: PipelineSettings,
    *,
    cache: bool,
    tracked: bool = True,
    dataset: bool = False,
) -> dsl.PipelineTask:
    task.set_display_name(stage.replace("_", "-"))
    task.set_caching_options(cache)
    kubernetes.set_image_pull_policy(task, settings.pull_policy(MODULES[stage].IMAGE))
    _resources(task, stage, settings)
    if tracked:
        _credentials(task, settings)
    if dataset:
        _dataset(task, settings)
    return task


def build_pipeline(default_params: str, settings: PipelineSettings, with_pretrain: bool = True):
    """The pipeline function, with `default_params` (components.runtime.params_json: the
    params minus the `pipeline` section) as the default of its params_json parameter.
    `with_pretrain` False (a recipe with pretrain.enabled false, as OIM) leaves the pretrain
    task out: train starts from the backbone's weights."""
    c = build_components(settings.images())
    shards = list(range(settings.extract_shards))

    def person_search(
        dataset_root: str = settings.dataset_mount,
        params_json: str = default_params,
    ):
        """Person search: ingest, pretrain, train, extract, evaluate, register, promote."""
        # Runs last whatever happens (a failed or cancelled task included) and ends the
        # execution's MLflow runs with its final state, so none is left RUNNING.
        closer = c.close_runs(params_json=params_json, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        _configure(closer, "close_runs", settings, cache=False)
        with dsl.ExitHandler(closer, name="close-mlflow-runs"):
            run = c.tracking(
                params_json=params_json,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            )
            # A new MLflow run per execution: never served from the cache.
            _configure(run, "tracking", settings, cache=False)
            run_id = run.output

            # KFP keys a task's cache on its inputs and, for a PVC, on the claim's name only:
            # the tasks reading the PVC take the data's digest (computed on every run) as an
            # input, so changed data is never served stale manifests or detections.
            digest = c.dataset_digest(dataset_root=dataset_root)
            _configure(digest, "dataset_digest", settings, cache=False, tracked=False, dataset=True)
            dataset_digest = digest.output

            ingest = c.ingest(
                dataset_root=dataset_root, dataset_digest=dataset_digest, params_json=params_json
            )
            # Ingest is a pure function of the raw data and params: rerunning a configuration
            # (a retry after a failed training) reuses its manifests while the data is the same.
            _configure(ingest, "ingest", settings, cache=True, tracked=False, dataset=True)
            manifests = ingest.outputs["manifests"]

            # What both training tasks take: checkpoints under <root>/<KFP run id>/<stage>.
            training = {
                "manifests": manifests,
                "params_json": params_json,
                "pipeline_run_id": run_id,
                "checkpoint_root": settings.checkpoint_root(),
                "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            }
            init = {}
            if with_pretrain:
                pretrain = c.pretrain(**training)
                _configure(pretrain, "pretrain", settings, cache=False, dataset=True)
                _training(pretrain, settings)
                init["idnet"] = pretrain.outputs["idnet"]

            # Training is never cached: each run is a new model and a new MLflow run.
            if settings.train_nodes > 1:
                # A Kubeflow Trainer TrainJob of several nodes, launched and followed by a
                # small task whose model output comes back through the checkpoint PVC.
                template = json.dumps(trainjob_template(settings), sort_keys=True)
                train = c.train_nodes(**training, **init, trainjob=template)
                _configure(train, "train_nodes", settings, cache=False)
            else:
                train = c.train(**training, **init)
                _configure(train, "train", settings, cache=False, dataset=True)
            _training(train, settings)
            model = train.outputs["model"]

            with dsl.ParallelFor(shards, name="extract-shards") as shard:
                extract = c.extract(
                    manifests=manifests,
                    model=model,
                    dataset_digest=dataset_digest,
                    params_json=params_json,
                    shard_index=shard,
                    shard_count=len(shards),
                )
                _configure(extract, "extract", settings, cache=True, tracked=False, dataset=True)
                # A shard lost to a preempted GPU node is retried, not the whole run.
                if settings.extract_retries:
                    extract.set_retry(
                        num_retries=settings.extract_retries,
                        backoff_duration="60s",
                        backoff_factor=2.0,
                    )

            merge = c.extract_merge(parts=dsl.Collected(extract.outputs["detections"]))
            _configure(merge, "extract_merge", settings, cache=True, tracked=False)

            evaluate = c.evaluate(
                manifests=manifests, detections=merge.outputs["detections"], params_json=params_json
            )
            _configure(evaluate, "evaluate", settings, cache=True, tracked=False)

            # The gallery index `psearch serve` loads, beside the evaluation (same inputs).
            gallery = c.index(
                manifests=manifests,
                detections=merge.outputs["detections"],
                model=model,
                params_json=params_json,
            )
            _configure(gallery, "index", settings, cache=True, tracked=False)

            register = c.register(
                model=model,
                report=evaluate.outputs["report"],
                params_json=params_json,
                pipeline_run_id=run_id,
            )
            # Registering has side effects in the MLflow registry: never cached.
            _configure(register, "register", settings, cache=False)

            # register's output is the new version when it beats the champion, else "".
            with dsl.If(register.output != "", name="beats-champion"):
                promote = c.promote(params_json=params_json, version=register.output)
                _configure(promote, "promote", settings, cache=False)

    return dsl.pipeline(name=settings.name, description=person_search.__doc__)(person_search)
