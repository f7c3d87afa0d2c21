"""Data: KiTS19 and saliency readers, phantom CT, transforms, parquet shards and ingestion."""
