"""Pre-training: data preparation, the loop (causal or masked LM) and its held-out evaluation."""
