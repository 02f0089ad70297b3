"""Scripts that build the bundled demo model: data and tokenizer, training, evaluation."""
