"""The Batch job engine shared by `tokenhive batch` and the HTTP Batches API."""
