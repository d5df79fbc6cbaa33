"""Training: IDNet pretraining (pretrain.Pretraining) and joint detection + re-id training
(joint.JointTraining).

Both are runner.TrainingStage subclasses naming their dataset, network and passes; the stage
runs the shared loop in engine (optimiser, schedule, AMP, DDP via distributed, exact resume
via checkpoint) and writes the model file and run.json.
"""
