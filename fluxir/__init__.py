"""fluxir: flow-model image restoration (degradations, data, models, training)."""
