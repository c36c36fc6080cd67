"""Where data lives and how results are written: local folders and S3 behind one `Location`
(storage), and the atomic, resumable output folder of the batch jobs (output)."""
