"""Building the weighted model: safe loading of base models, checkpoints and LoRAs in every common layout,
streaming checkpoint merges, weighted LoRA fusion, a pipeline cache, and sampling."""
