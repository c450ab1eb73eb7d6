"""The classes of a logged MLflow model, under the module path they were pickled with.

MLflow's pytorch flavour pickles the whole model (cnnlab.training.callbacks.LogMLflowModel logs
FromPixels(WithProbabilities(network, head))), and a pickle names each class by its module path.
Models logged before the package moved into wings name cnnlab.heads.FromPixels,
cnnlab.heads.WithProbabilities and cnnlab.heads.SoftmaxHead or SigmoidHead; this module keeps that
path so they still load. The network itself is a torch.nn.Sequential of torch's own layers, so no
other cnnlab module is pickled. The code is cnnlab.training.heads; import it from there.
"""

from cnnlab.training.heads import FromPixels, SigmoidHead, SoftmaxHead, WithProbabilities

__all__ = ["FromPixels", "SigmoidHead", "SoftmaxHead", "WithProbabilities"]
