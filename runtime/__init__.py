"""Edge-side runtime: model loading, transformer blocks, PEFT methods, data, local training."""
