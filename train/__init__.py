"""Train the Kandinsky 2.2 prior or decoder from a precompute cache: `python -m train prior|decoder`."""
