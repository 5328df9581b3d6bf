"""Data: the embedded synthetic "shapes" world, webdataset shards, the conversation template."""
