"""The benchmark suite: phi3v-ort against the transformers reference, same weights, same boundaries."""
