"""Model compression: quantization, pruning and the `python -m compress` command.

    from compress import methods
    out = methods.apply("gptq", source, calibration=batches, options={"bits": "4", "group": "128"})

Every method is registered in `compress.methods.METHODS` by the module that implements it (the
quantized tensors themselves live in `models.quant`; distillation is a trainer objective,
`objective=distill`).
"""
