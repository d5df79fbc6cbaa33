"""The data room: raw datasets in, manifests out, and the loaders training and inference read.

- records, cuhk_sysu, prw, matfiles, matfast: the raw CUHK-SYSU and PRW readers (.mat files)
- ingest: a raw dataset -> the manifests (docs/contract.md), written atomically
- manifest: the manifest and detection schemas, checked reading and writing
- loaders: datasets, samplers and DataLoaders over the manifests

The synthetic generator that writes raw CUHK-SYSU layouts lives beside it, in psearch.synth.
"""
