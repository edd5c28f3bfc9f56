"""The detection task the harness trains and evaluates variants on: data, head, metrics, training."""
