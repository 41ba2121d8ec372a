"""The sampler: prefill once, decode in a while_loop (sampler.py); temperature, top-k and top-p
(filters.py); EOS and pad ids. It knows nothing of RL."""
