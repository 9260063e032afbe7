"""totalVI for CITE-seq: config, module, likelihoods, priors and the KL schedule. No I/O, no distribution."""

from streamtotal.model.config import ModelConfig
from streamtotal.model.kl_schedule import kl_weight
from streamtotal.model.likelihoods import log_nb, log_nb_mixture
from streamtotal.model.outputs import GenerativeOutputs, InferenceOutputs, LossOutput
from streamtotal.model.protein_prior import LibraryPrior, ProteinBackgroundPrior
from streamtotal.model.rna_likelihood import nb_log_likelihood_from_logits
from streamtotal.model.totalvi import TotalVAE

__all__ = [
    "GenerativeOutputs",
    "InferenceOutputs",
    "LibraryPrior",
    "LossOutput",
    "ModelConfig",
    "ProteinBackgroundPrior",
    "TotalVAE",
    "kl_weight",
    "log_nb",
    "log_nb_mixture",
    "nb_log_likelihood_from_logits",
]
