"""Training: pretraining on next events and multitask prompted finetuning."""
