"""Where data lives and how results are written: local folders and S3 behind one `Location`
(storage), the atomic, resumable output folder of the batch jobs (output), and models by name
(models: directories, Hugging Face ids, s3:// prefixes, the MLflow registry)."""
