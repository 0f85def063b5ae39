"""The quantizer pipeline: recipes and presets (:mod:`.recipe`, :mod:`.presets`) -> which layers
get which formats (:mod:`.selection`) -> quantized modules built and swapped in (:mod:`.build`) ->
a :class:`~.state.QuantState` with a :class:`~.summary.QuantSummary` on the denoiser
(:mod:`.apply`: ``diffq.quantize``). Import the submodules; this package file imports nothing."""
