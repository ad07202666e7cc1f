"""Drop-ins named as in ``torch.nn.utils``: ``spectral_norm`` is the hook form
(``weight_orig`` / ``weight_u`` / ``weight_v``), removable with torch's own
``remove_spectral_norm``, re-exported here. Unlike torch's hook form it refuses
complex weights (torch's transposes without conjugating); the parametrization form,
``fastgan.nn.spectral_norm``, takes them."""
from torch.nn.utils import remove_spectral_norm

from fastgan.nn.spectral_norm import hook_spectral_norm as spectral_norm

__all__ = ["spectral_norm", "remove_spectral_norm"]
