"""Front ends (the TransformerLens layout, torch.fx, Hugging Face, the testbed), ACG fitting, and lowering to the IR."""
