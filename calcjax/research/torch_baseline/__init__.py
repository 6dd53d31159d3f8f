"""The PyTorch twin of DenseRAUnet and its loss, and weight conversion to and from the JAX model.

Optional: needs the ``torch`` extra (``pip install 'calcjax[torch]'``). Layer order, padding and names follow
``calcjax.model.network`` so identical weights give identical outputs (tested to float32 tolerance).
"""
