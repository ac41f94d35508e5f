"""Training on top of transformers Trainer, PEFT and Accelerate: recipes, collators, precision policy, LoRA."""
