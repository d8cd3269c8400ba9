"""The default allowlist as plain data; `duet_p2p.allowlist` turns it into `AllowedOp` entries.

Each group names operations that share a receiver (or module), a category, a return kind and
flags. Keys: ``under`` (dotted prefix), ``names`` (whitespace-separated), ``category``,
``returns`` (a `ReturnKind` value) and the optional booleans ``inplace`` (mutates an object that
already exists), ``random`` (draws from the owner's RNG), ``reduction`` (summarises many
elements into few) and ``attribute`` (an attribute read, not a call).
"""

from __future__ import annotations

T = "torch.Tensor"
F = "torch.nn.functional"
NN = "torch.nn"
LINALG = "torch.linalg"

GROUPS: tuple[dict[str, object], ...] = (
    # ---------------------------------------------------------------- torch.Tensor methods
    {
        "under": T,
        "category": "arithmetic",
        "returns": "tensor",
        "names": """
            add sub mul div true_divide floor_divide remainder fmod pow float_power
            neg negative abs absolute positive sqrt rsqrt square reciprocal
            exp exp2 expm1 log log1p log2 log10 logaddexp logaddexp2 xlogy
            sin cos tan asin acos atan atan2 sinh cosh tanh asinh acosh atanh hypot
            sigmoid logit relu erf erfc erfinv lgamma digamma i0 sinc
            clamp clip clamp_min clamp_max floor ceil round trunc frac
            sign sgn signbit copysign heaviside nan_to_num deg2rad rad2deg lerp diff
            addmm addmv addcmul addcdiv matmul mm bmm dot vdot mv outer inner cross kron
            softmax log_softmax bitwise_and bitwise_or bitwise_xor bitwise_not
            logical_and logical_or logical_xor logical_not
            tril triu diag diagonal diag_embed
        """,
    },
    {
        "under": T,
        "category": "linalg",
        "returns": "tensor",
        "names": "det logdet inverse pinverse cholesky matrix_power matrix_exp",
    },
    {"under": T, "category": "linalg", "returns": "tuple", "names": "slogdet qr svd"},
    {
        "under": T,
        "category": "reduction",
        "returns": "tensor",
        "reduction": True,
        "names": """
            sum mean std var prod amax amin argmax argmin logsumexp norm all any
            count_nonzero nansum nanmean quantile nanquantile trace
        """,
    },
    {
        "under": T,
        "category": "reduction",
        "returns": "auto",
        "reduction": True,
        "names": "max min median nanmedian",
    },
    {
        "under": T,
        "category": "reduction",
        "returns": "tuple",
        "reduction": True,
        "names": "mode kthvalue aminmax",
    },
    {
        "under": T,
        "category": "statistics",
        "returns": "tensor",
        "reduction": True,
        "names": "bincount histc cov corrcoef",
    },
    {"under": T, "category": "scan", "returns": "tensor", "names": "cumsum cumprod logcumsumexp"},
    {"under": T, "category": "scan", "returns": "tuple", "names": "cummax cummin"},
    {
        "under": T,
        "category": "comparison",
        "returns": "tensor",
        "names": """
            eq ne lt le gt ge greater less greater_equal less_equal not_equal
            isnan isinf isfinite isposinf isneginf isclose maximum minimum fmax fmin where
        """,
    },
    {
        "under": T,
        "category": "comparison",
        "returns": "bool",
        "names": "allclose equal",
    },
    {
        "under": T,
        "category": "shape",
        "returns": "tensor",
        "names": """
            view view_as reshape reshape_as flatten unflatten ravel squeeze unsqueeze
            permute transpose swapaxes swapdims movedim moveaxis t expand expand_as
            broadcast_to repeat repeat_interleave tile contiguous clone flip fliplr flipud
            roll rot90 narrow unfold
        """,
    },
    {
        "under": T,
        "category": "shape",
        "returns": "tuple",
        "names": "split chunk unbind tensor_split hsplit vsplit",
    },
    {
        "under": T,
        "category": "indexing",
        "returns": "tensor",
        "names": """
            gather scatter scatter_add scatter_reduce index_select index_add index_fill
            index_copy masked_fill masked_select masked_scatter take take_along_dim
            nonzero argwhere
        """,
    },
    {"under": T, "category": "sorting", "returns": "tensor", "names": "argsort msort"},
    {"under": T, "category": "sorting", "returns": "tuple", "names": "sort topk"},
    {"under": T, "category": "sorting", "returns": "auto", "names": "unique unique_consecutive"},
    {
        "under": T,
        "category": "conversion",
        "returns": "tensor",
        "names": "type_as float double half bfloat16 int long short bool byte char to cpu",
    },
    {
        "under": T,
        "category": "creation",
        "returns": "tensor",
        "names": "new_zeros new_ones new_full new_tensor",
    },
    {"under": T, "category": "conversion", "returns": "number", "names": "item"},
    {"under": T, "category": "conversion", "returns": "list", "names": "tolist"},
    {
        "under": T,
        "category": "metadata",
        "returns": "number",
        "names": "dim ndimension numel nelement element_size",
    },
    {"under": T, "category": "metadata", "returns": "size", "names": "size"},
    {
        "under": T,
        "category": "metadata",
        "returns": "bool",
        "names": "is_floating_point is_complex is_contiguous",
    },
    {
        "under": T,
        "category": "arithmetic",
        "returns": "tensor",
        "inplace": True,
        "names": """
            add_ sub_ mul_ div_ pow_ neg_ abs_ sqrt_ exp_ log_ clamp_ clip_ floor_ ceil_
            round_ sigmoid_ tanh_ relu_ lerp_ addcmul_ addcdiv_ zero_ fill_ copy_
            masked_fill_ index_fill_ index_add_ scatter_ scatter_add_ fill_diagonal_
        """,
    },
    {
        "under": T,
        "category": "random",
        "returns": "tensor",
        "random": True,
        "names": "bernoulli multinomial",
    },
    {
        "under": T,
        "category": "random",
        "returns": "tensor",
        "random": True,
        "inplace": True,
        "names": "uniform_ normal_ bernoulli_ random_ exponential_",
    },
    {"under": T, "category": "autograd", "returns": "tensor", "names": "detach"},
    {
        "under": T,
        "category": "autograd",
        "returns": "tensor",
        "inplace": True,
        "names": "requires_grad_",
    },
    {"under": T, "category": "autograd", "returns": "none", "inplace": True, "names": "backward"},
    # ---------------------------------------------------------------- torch.Tensor attributes
    {
        "under": T,
        "category": "shape",
        "returns": "tensor",
        "attribute": True,
        "names": "T mT H mH real imag",
    },
    {"under": T, "category": "autograd", "returns": "tensor", "attribute": True, "names": "grad"},
    {"under": T, "category": "autograd", "returns": "tensor", "attribute": True, "names": "data"},
    {
        "under": T,
        "category": "autograd",
        "returns": "bool",
        "attribute": True,
        "names": "requires_grad is_leaf",
    },
    {"under": T, "category": "metadata", "returns": "size", "attribute": True, "names": "shape"},
    {"under": T, "category": "metadata", "returns": "dtype", "attribute": True, "names": "dtype"},
    {
        "under": T,
        "category": "metadata",
        "returns": "number",
        "attribute": True,
        "names": "ndim itemsize nbytes",
    },
    # ---------------------------------------------------------------- Python operators
    {
        "under": T,
        "category": "operator",
        "returns": "tensor",
        "names": """
            __add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__
            __floordiv__ __rfloordiv__ __mod__ __rmod__ __pow__ __rpow__ __matmul__
            __rmatmul__ __neg__ __pos__ __abs__ __invert__ __and__ __rand__ __or__ __ror__
            __xor__ __rxor__ __lshift__ __rlshift__ __rshift__ __rrshift__
            __lt__ __le__ __gt__ __ge__ __eq__ __ne__ __getitem__
        """,
    },
    {
        "under": T,
        "category": "operator",
        "returns": "tensor",
        "inplace": True,
        "names": """
            __iadd__ __isub__ __imul__ __itruediv__ __ifloordiv__ __imod__ __ipow__
            __iand__ __ior__ __ixor__ __ilshift__ __irshift__
        """,
    },
    {
        "under": T,
        "category": "operator",
        "returns": "none",
        "inplace": True,
        "names": "__setitem__",
    },
    {"under": T, "category": "operator", "returns": "number", "names": "__len__"},
    # ---------------------------------------------------------------- torch functions
    {
        "under": "torch",
        "category": "creation",
        "returns": "tensor",
        "names": """
            tensor zeros ones full zeros_like ones_like full_like arange linspace logspace
            eye tril_indices triu_indices
        """,
    },
    {
        "under": "torch",
        "category": "random",
        "returns": "tensor",
        "random": True,
        "names": """
            rand randn randint randperm rand_like randn_like randint_like normal
            bernoulli multinomial poisson
        """,
    },
    {
        "under": "torch",
        "category": "arithmetic",
        "returns": "tensor",
        "names": """
            add sub subtract mul multiply div divide true_divide floor_divide remainder fmod
            pow float_power neg negative abs sqrt rsqrt square reciprocal exp exp2 expm1
            log log1p log2 log10 logaddexp xlogy sin cos tan asin acos atan atan2 sinh cosh
            tanh hypot sigmoid logit relu erf erfc erfinv lgamma clamp clip floor ceil round
            trunc frac sign nan_to_num deg2rad rad2deg lerp diff addmm addcmul addcdiv matmul
            mm bmm dot vdot mv outer inner einsum kron cross cdist dist cosine_similarity
            softmax log_softmax logical_and logical_or logical_not tril triu diag diagonal
            diag_embed block_diag cartesian_prod
        """,
    },
    {
        "under": "torch",
        "category": "linalg",
        "returns": "tensor",
        "names": "det logdet inverse pinverse cholesky matrix_power matrix_exp",
    },
    {"under": "torch", "category": "linalg", "returns": "tuple", "names": "slogdet svd"},
    {
        "under": "torch",
        "category": "reduction",
        "returns": "tensor",
        "reduction": True,
        "names": """
            sum mean std var prod amax amin argmax argmin logsumexp norm all any
            count_nonzero nansum nanmean quantile nanquantile trace
        """,
    },
    {
        "under": "torch",
        "category": "reduction",
        "returns": "auto",
        "reduction": True,
        "names": "max min median nanmedian",
    },
    {
        "under": "torch",
        "category": "reduction",
        "returns": "tuple",
        "reduction": True,
        "names": "mode kthvalue aminmax std_mean var_mean",
    },
    {
        "under": "torch",
        "category": "statistics",
        "returns": "tensor",
        "reduction": True,
        "names": "bincount histc cov corrcoef",
    },
    {
        "under": "torch",
        "category": "statistics",
        "returns": "tuple",
        "reduction": True,
        "names": "histogram",
    },
    {
        "under": "torch",
        "category": "scan",
        "returns": "tensor",
        "names": "cumsum cumprod logcumsumexp",
    },
    {"under": "torch", "category": "scan", "returns": "tuple", "names": "cummax cummin"},
    {
        "under": "torch",
        "category": "comparison",
        "returns": "tensor",
        "names": """
            eq ne lt le gt ge isnan isinf isfinite isposinf isneginf isclose maximum minimum
            fmax fmin where
        """,
    },
    {"under": "torch", "category": "comparison", "returns": "bool", "names": "allclose equal"},
    {
        "under": "torch",
        "category": "shape",
        "returns": "tensor",
        "names": """
            cat concat concatenate stack hstack vstack dstack column_stack reshape flatten
            unflatten ravel squeeze unsqueeze permute transpose swapaxes movedim t flip fliplr
            flipud roll rot90 narrow broadcast_to repeat_interleave tile clone atleast_1d
            atleast_2d atleast_3d
        """,
    },
    {
        "under": "torch",
        "category": "shape",
        "returns": "tuple",
        "names": "split chunk unbind tensor_split hsplit vsplit meshgrid broadcast_tensors",
    },
    {
        "under": "torch",
        "category": "indexing",
        "returns": "tensor",
        "names": """
            gather scatter scatter_add scatter_reduce index_select index_add masked_select
            take take_along_dim nonzero argwhere
        """,
    },
    {
        "under": "torch",
        "category": "sorting",
        "returns": "tensor",
        "names": "argsort msort bucketize searchsorted",
    },
    {"under": "torch", "category": "sorting", "returns": "tuple", "names": "sort topk"},
    {
        "under": "torch",
        "category": "sorting",
        "returns": "auto",
        "names": "unique unique_consecutive",
    },
    {"under": "torch", "category": "metadata", "returns": "number", "names": "numel"},
    {"under": "torch", "category": "metadata", "returns": "bool", "names": "is_floating_point"},
    # ---------------------------------------------------------------- torch.linalg / fft / special
    {
        "under": LINALG,
        "category": "linalg",
        "returns": "tensor",
        "reduction": True,
        "names": "norm vector_norm matrix_norm",
    },
    {
        "under": LINALG,
        "category": "linalg",
        "returns": "tensor",
        "names": """
            det inv pinv solve svdvals eigvals eigvalsh cholesky matrix_rank cross multi_dot
            matrix_power matrix_exp cond
        """,
    },
    {
        "under": LINALG,
        "category": "linalg",
        "returns": "tuple",
        "names": "slogdet lstsq qr svd eig eigh",
    },
    {
        "under": "torch.fft",
        "category": "fft",
        "returns": "tensor",
        "names": "fft ifft rfft irfft fft2 ifft2 rfft2 irfft2 fftn ifftn fftfreq rfftfreq fftshift",
    },
    {
        "under": "torch.special",
        "category": "arithmetic",
        "returns": "tensor",
        "names": "expit logit xlogy entr erf erfc erfinv gammaln digamma logsumexp softmax",
    },
    # ---------------------------------------------------------------- torch.nn.functional
    {
        "under": F,
        "category": "nn.functional",
        "returns": "tensor",
        "names": """
            relu relu6 leaky_relu gelu elu selu celu silu mish softplus softsign hardtanh
            hardsigmoid hardswish logsigmoid softmax log_softmax softmin sigmoid tanh glu
            linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d
            max_pool1d max_pool2d avg_pool1d avg_pool2d adaptive_avg_pool1d
            adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d layer_norm
            group_norm instance_norm normalize one_hot embedding pad interpolate unfold fold
            pixel_shuffle cosine_similarity pairwise_distance pdist
        """,
    },
    {
        "under": F,
        "category": "nn.functional",
        "returns": "tensor",
        "random": True,
        "names": "dropout dropout1d dropout2d alpha_dropout",
    },
    {"under": F, "category": "nn.functional", "returns": "tensor", "names": "batch_norm"},
    {
        "under": F,
        "category": "loss",
        "returns": "tensor",
        "reduction": True,
        "names": """
            cross_entropy nll_loss mse_loss l1_loss smooth_l1_loss huber_loss
            binary_cross_entropy binary_cross_entropy_with_logits kl_div
            cosine_embedding_loss margin_ranking_loss hinge_embedding_loss soft_margin_loss
            triplet_margin_loss poisson_nll_loss gaussian_nll_loss multi_margin_loss
        """,
    },
    # ---------------------------------------------------------------- torch.nn.init (in place)
    {
        "under": "torch.nn.init",
        "category": "init",
        "returns": "tensor",
        "inplace": True,
        "names": "zeros_ ones_ constant_ eye_",
    },
    {
        "under": "torch.nn.init",
        "category": "init",
        "returns": "tensor",
        "inplace": True,
        "random": True,
        "names": """
            uniform_ normal_ xavier_uniform_ xavier_normal_ kaiming_uniform_ kaiming_normal_
            trunc_normal_ orthogonal_
        """,
    },
    # ---------------------------------------------------------------- torch.nn modules
    {
        "under": NN,
        "category": "module",
        "returns": "module",
        "names": """
            Sequential ModuleList ModuleDict Identity BatchNorm1d BatchNorm2d LayerNorm
            GroupNorm Dropout Dropout1d Dropout2d ReLU ReLU6 LeakyReLU GELU ELU SELU SiLU
            Mish Softplus Tanh Sigmoid Softmax LogSoftmax Hardtanh PReLU Flatten Unflatten
            MaxPool1d MaxPool2d AvgPool1d AvgPool2d AdaptiveAvgPool1d AdaptiveAvgPool2d
            AdaptiveMaxPool2d Upsample TransformerEncoder
        """,
    },
    {
        "under": NN,
        "category": "module",
        "returns": "module",
        "random": True,
        "names": """
            Linear Bilinear Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d Embedding
            EmbeddingBag LSTM GRU RNN LSTMCell GRUCell MultiheadAttention
            TransformerEncoderLayer
        """,
    },
    {
        "under": NN,
        "category": "loss",
        "returns": "module",
        "names": """
            CrossEntropyLoss NLLLoss MSELoss L1Loss BCELoss BCEWithLogitsLoss HuberLoss
            SmoothL1Loss KLDivLoss CosineEmbeddingLoss MarginRankingLoss TripletMarginLoss
        """,
    },
    {
        "under": "torch.nn.Module",
        "category": "module",
        "returns": "auto",
        "names": "__call__ forward",
    },
    {
        "under": "torch.nn.Module",
        "category": "module",
        "returns": "parameters",
        "names": "parameters",
    },
    {
        "under": "torch.nn.Module",
        "category": "module",
        "returns": "state_dict",
        "names": "state_dict",
    },
    {
        "under": "torch.nn.Module",
        "category": "module",
        "returns": "module",
        "inplace": True,
        "names": "train eval requires_grad_ float double",
    },
    {
        "under": "torch.nn.Module",
        "category": "module",
        "returns": "none",
        "inplace": True,
        "names": "zero_grad load_state_dict",
    },
    # ---------------------------------------------------------------- torch.optim
    {
        "under": "torch.optim",
        "category": "optimizer",
        "returns": "optimizer",
        "names": "SGD Adam AdamW RMSprop Adagrad Adadelta Adamax NAdam RAdam",
    },
    {
        "under": "torch.optim.Optimizer",
        "category": "optimizer",
        "returns": "none",
        "inplace": True,
        "names": "step zero_grad",
    },
)

NOTES: dict[str, str] = {
    "torch.Tensor.to": "dtype conversions only: the executor refuses device, copy and memory "
    "format arguments",
    "torch.Tensor.cpu": "returns the tensor itself on a CPU-only owner",
    "torch.Tensor.data": "shares storage with the tensor it is read from",
    "torch.Tensor.grad": "the result is None while no gradient has been accumulated",
    "torch.Tensor.backward": "accumulates into .grad of every leaf the graph reaches",
    "torch.Tensor.__setitem__": "writes into the tensor; the value must be a tensor or number",
    "torch.Tensor.__len__": "the length of the first dimension",
    "torch.Tensor.item": "a read of a one-element tensor, not an aggregate",
    "torch.Tensor.tolist": "nested Python numbers",
    "torch.tensor": "data must be literals decoded from the wire, never owner objects",
    "torch.Tensor.max": "a tensor without dim, a (values, indices) tuple with dim",
    "torch.Tensor.min": "a tensor without dim, a (values, indices) tuple with dim",
    "torch.Tensor.median": "a tensor without dim, a (values, indices) tuple with dim",
    "torch.Tensor.nanmedian": "a tensor without dim, a (values, indices) tuple with dim",
    "torch.max": "a tensor without dim, a (values, indices) tuple with dim",
    "torch.min": "a tensor without dim, a (values, indices) tuple with dim",
    "torch.median": "a tensor without dim, a (values, indices) tuple with dim",
    "torch.nanmedian": "a tensor without dim, a (values, indices) tuple with dim",
    "torch.unique": "a tuple when return_inverse or return_counts is set",
    "torch.Tensor.unique": "a tuple when return_inverse or return_counts is set",
    "torch.unique_consecutive": "a tuple when return_inverse or return_counts is set",
    "torch.Tensor.unique_consecutive": "a tuple when return_inverse or return_counts is set",
    "torch.nn.functional.batch_norm": "with training=True it updates running_mean and "
    "running_var in place",
    "torch.nn.Module.__call__": "a tensor, or a tuple for recurrent modules (LSTM, GRU, RNN)",
    "torch.nn.Module.forward": "a tensor, or a tuple for recurrent modules (LSTM, GRU, RNN)",
    "torch.nn.Module.load_state_dict": "the key report it returns is dropped by the executor",
    "torch.optim.Optimizer.step": "closures are refused by the executor",
}
