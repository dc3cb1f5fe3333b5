"""The data path, top-down: sources -> tokenizer -> store -> mixture -> loader -> datamodule."""
