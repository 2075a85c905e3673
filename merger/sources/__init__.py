"""Model reference -> ModelInfo (config, tensor index, tokenizer files), metadata only: bundled models,
allow-listed local folders and the Hub."""
