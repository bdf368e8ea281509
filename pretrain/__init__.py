"""The GLM base model: architecture, Hugging Face adapter, tokenizer, data pipeline, pretraining."""
