"""What runs around the compiled graphs: the per-model runtime object and the one module that touches
torch's and transformers' internals (:mod:`libra_fx.runtime.compat`)."""
