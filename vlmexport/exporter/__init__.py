"""Exporters: a model's parts written straight from checkpoint tensors, one format each.

``onnx_common`` / ``onnx_vision`` / ``onnx_decoder`` write the split ONNX graphs (vision
encoder, connector, text decoder, token embedding); ``gguf_writer`` writes llama.cpp's
text GGUF and mmproj. Nothing here runs a model, quantizes, or writes a bundle: the
orchestration (``vlmexport.pipeline``: load -> export -> quantize -> validate ->
package) calls these and validates what they wrote. Nothing here names an
architecture: the part specs and connector kinds of ``vlmexport.models`` say what to write.
"""
