"""The Serve application's entry (app.py) and deploy config (config.yaml)."""
