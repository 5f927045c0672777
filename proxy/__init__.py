"""Media Sidecar: serve media bytes from disk and S3 beside a web backend."""
