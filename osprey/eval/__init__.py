"""Evaluation: the paper's benchmarks and metrics, run as Ray jobs (`osprey eval`).

- `semantic`: Semantic Similarity and Semantic IoU (LVIS, PACO);
- `captioning`: METEOR and CIDEr (RefCOCOg) through pycocoevalcap;
- `openvocab`: class matching, PQ, mIoU and mask AP (ADE20K, Cityscapes);
- `pope`: POPE's accuracy, precision, recall, F1 and yes-ratio;
- `readers`: each benchmark's annotations in their original formats;
- `benchmarks`: the registry (files, prompts, scorers, the paper's numbers);
- `answer`, `job`, `tracking`: the Ray Data answering stage, the job, MLflow;
- `shapes`: the synthetic benchmark every quickstart model gets.
"""
