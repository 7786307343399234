"""Models from outside timm converted the way a new user calls it: without example inputs (inferred from
the layer that first reads the input), with variadic forwards, with a dict of keyword inputs, Hugging
Face default configs and torch.export DAGs at several batch sizes. Every DAG is compared to the eager
model on fresh inputs at the inferred shape and at batch 2."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
from torch import nn

import torch_dag as td
from torch_dag.core.compare import compare_outputs


def run(module, *args, **kwargs):
    with torch.no_grad():
        return module(*args, **kwargs)


def fresh_inputs(dag: td.DagModule, batch: int | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    """New random inputs shaped like the DAG's recorded ones (ids below `high`), at `batch` if given."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for name in dag.input_names:
        meta = dag.input_meta[name]
        shape = list(meta["shape"])
        if batch is not None:
            shape[0] = batch
        if meta["dtype"] == "int64":
            inputs[name] = torch.randint(0, meta["high"], shape, generator=generator)
        else:
            inputs[name] = torch.randn(shape, generator=generator)
    return inputs


def assert_equal_without_inputs(model: nn.Module, high: int = 0) -> td.DagModule:
    """Convert `model` with no example inputs; compare to eager at the inferred shape and at batch 2."""
    model.eval()
    dag = td.build_from_unstructured_module(model)
    for name in dag.input_names:
        assert dag.input_meta[name]["inferred"] is True, dag.input_meta
        dag.input_meta[name]["high"] = high
    for batch in (None, 2):
        inputs = fresh_inputs(dag, batch)
        equal, worst, why = compare_outputs(run(model, **inputs), run(dag, **inputs))
        assert equal, (batch, worst, why)
    return dag


# --- hand-written models in common idioms ---------------------------------------------------------


class UnpackedShapeAttention(nn.Module):
    """`B, C, H, W = x.shape` then self-attention over the pixels and `x.mean((2, 3))`."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).reshape(B, H * W, 3, C).unbind(2)
        attn = (q @ k.transpose(1, 2) / C**0.5).softmax(-1)
        x = x + (attn @ v).transpose(1, 2).reshape(B, C, H, W)
        return self.head(x.mean((2, 3)))


class EinsumMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 8, stride=8)
        self.weight = nn.Parameter(torch.randn(8, 12))

    def forward(self, x):
        x = self.stem(x)
        return torch.einsum("bchw,cd->bdhw", x, self.weight).amax((2, 3))


class WithMultiheadAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(20, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        h = self.embed(x)
        return self.attn(h, h, h, need_weights=False)[0]


class Variadic(nn.Module):
    """`forward(self, x, *args, **kwargs)`, as detection and segmentation libraries write it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x, *args, **kwargs):
        y = self.conv(x)
        if "scale" in kwargs:
            y = y * kwargs["scale"]
        return y.relu()


@torch.fx.wrap
def _rescale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] > 4:  # control flow plain fx cannot follow
        return x * 0.5
    return x


class WrappedHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        return _rescale(self.conv(x))


class Audio(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, 8, 10, stride=5), nn.GELU(), nn.Conv1d(8, 8, 3, stride=2))
        self.head = nn.Linear(8, 5)

    def forward(self, wave):
        return self.head(self.features(wave).mean(-1))


class Video(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(3, 4, (3, 7, 7), stride=(2, 4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, clip):
        return self.head(self.stem(clip).relu().mean((2, 3, 4)))


class Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, ids):
        B, N = ids.shape
        h = self.embed(ids) + self.embed.weight[:N]
        return self.proj(h).reshape(B, -1)


class TwoImages(nn.Module):
    """Optical flow's signature: a second required image gets the same kind of input."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 8, stride=8)

    def forward(self, image1, image2, iterations=2):
        a, b = self.encoder(image1), self.encoder(image2)
        for _ in range(iterations):
            a = a + (a * b).softmax(1)
        return a


class Waveform(nn.Module):
    """Takes a batch of waveforms (B, T) and adds the channel axis itself, as speech models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 10, stride=5)
        self.head = nn.Linear(8, 4)

    def forward(self, wave):
        return self.head(self.conv(wave[:, None]).mean(-1))


class FixedSizePatches(nn.Module):
    """A patch embedding with a position table for one image size, which the model declares."""

    def __init__(self, image_size: int = 64, patch: int = 16):
        super().__init__()
        self.image_size = image_size
        self.patches = nn.Conv2d(3, 8, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, 8))

    def forward(self, x):
        return (self.patches(x).flatten(2).transpose(1, 2) + self.position).mean(1)


class CachesOnItself(nn.Module):
    """Stores a table made from the input's sizes on itself (as timm's ConViT does)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)
        self.table = None

    def forward(self, x):
        self.table = torch.arange(x.shape[-1], dtype=x.dtype)
        return self.fc(x) + self.table


@pytest.mark.parametrize(
    "cls, high",
    [
        (UnpackedShapeAttention, 0),
        (EinsumMixer, 0),
        (WithMultiheadAttention, 0),
        (Variadic, 0),
        (WrappedHelper, 0),
        (Audio, 0),
        (Video, 0),
        (Text, 50),
        (TwoImages, 0),
        (CachesOnItself, 0),
        (Waveform, 0),
        (FixedSizePatches, 0),
    ],
)
def test_hand_written_models_convert_without_inputs(cls, high):
    torch.manual_seed(0)
    model = cls()
    assert_equal_without_inputs(model, high)
    assert not any(isinstance(v, torch.fx.Proxy) for m in model.modules() for v in vars(m).values())


def test_inferred_inputs_are_recorded_and_saved(tmp_path):
    torch.manual_seed(0)
    dag = td.build_from_unstructured_module(Audio().eval())
    meta = dag.input_meta["wave"]
    assert meta["shape"] == [1, 1, 1024] and meta["inferred"] is True
    assert meta["inferred_from"] == "Conv1d 'features.0'"
    td.save(dag, tmp_path / "a.dag")
    assert td.load(tmp_path / "a.dag").input_meta["wave"] == meta
    video = td.build_from_unstructured_module(Video().eval())
    assert video.input_meta["clip"]["shape"] == [1, 3, 16, 112, 112]
    text = td.build_from_unstructured_module(Text().eval())
    assert text.input_meta["ids"]["shape"] == [1, 16] and text.input_meta["ids"]["dtype"] == "int64"
    wave = td.build_from_unstructured_module(Waveform().eval())
    assert wave.input_meta["wave"]["shape"] == [1, 1024]  # (1, 1, 1024) does not run: the next guess
    patches = td.build_from_unstructured_module(FixedSizePatches().eval())
    assert patches.input_meta["x"]["shape"] == [1, 3, 64, 64]  # the declared size before 224
    given = td.build_from_unstructured_module(Audio().eval(), torch.randn(1, 1, 500))
    assert "inferred" not in given.input_meta["wave"]


def test_a_model_whose_input_cannot_be_read_gets_the_call_with_example_inputs():
    class NoReader(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            B, N, C = x.shape  # fx cannot unpack a symbolic shape either
            return self.norm(x).reshape(B, N * C)

    with pytest.raises(
        td.ConversionError, match=r"cannot infer.*td\.build_from_unstructured_module\(model, "
    ):
        td.build_from_unstructured_module(NoReader())


def test_a_guess_the_model_does_not_run_on_is_refused_with_what_was_tried():
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            B, _, _, _ = x.shape  # channels last: a plain symbolic trace cannot unpack it either
            return self.conv(x.permute(0, 3, 1, 2)).reshape(B, -1)

    with pytest.raises(td.ConversionError, match=r"\(1, 3, 224, 224\).*Conv2d 'conv'.*RuntimeError"):
        td.build_from_unstructured_module(ChannelsLast())


# --- variadic forwards and dict inputs ------------------------------------------------------------


def test_variadic_forward_binds_named_inputs_and_kwargs_entries():
    torch.manual_seed(0)
    model = Variadic().eval()
    x = torch.randn(2, 3, 32, 32)
    dag = td.build_from_unstructured_module(model, x)
    assert dag.input_names == ["x"]
    y = torch.randn(3, 3, 40, 40)
    assert compare_outputs(run(model, y), run(dag, y))[0]
    scale = torch.rand(1, 8, 1, 1)
    scaled = td.build_from_unstructured_module(model, x, {"scale": scale})
    assert scaled.input_names == ["x", "scale"]
    assert compare_outputs(run(model, y, scale=scale), run(scaled, y, scale=scale))[0]
    with pytest.raises(td.ConversionError, match=r"\*args"):
        td.build_from_unstructured_module(model, (x, x))


def test_a_dict_of_example_inputs_is_keyword_inputs():
    torch.manual_seed(0)
    model = TwoImages().eval()
    images = {"image2": torch.randn(1, 3, 32, 32), "image1": torch.randn(1, 3, 32, 32)}
    dag = td.build_from_unstructured_module(model, images)
    assert dag.input_names == ["image1", "image2"]
    other = {"image1": torch.randn(2, 3, 48, 48), "image2": torch.randn(2, 3, 48, 48)}
    assert compare_outputs(run(model, **other), run(dag, **other))[0]
    with pytest.raises(td.ConversionError, match="both"):
        td.build_from_unstructured_module(model, images, {"image1": images["image1"]})


# --- torch.export DAGs at several batch sizes -----------------------------------------------------


class BatchReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(x.shape[0], -1))


@pytest.mark.parametrize("traced_at", [1, 3])
def test_an_exported_dag_runs_at_batch_1_and_3(traced_at):
    torch.manual_seed(0)
    model = BatchReshape().eval()
    dag = td.build_from_unstructured_module(model, torch.randn(traced_at, 3, 16, 16), tracer="export")
    assert dag.traced_with == "export"
    for batch in (1, 3, 5):
        x = torch.randn(batch, 3, 16, 16)
        assert compare_outputs(run(model, x), run(dag, x))[0], batch


def test_an_export_dag_squeezing_the_batch_follows_the_batch():
    class SqueezesOne(nn.Module):
        def forward(self, x):
            return x.squeeze(0) * 2  # batch 1 drops the axis, any other batch keeps it

    dag = td.build_from_unstructured_module(SqueezesOne(), torch.randn(1, 4), tracer="export")
    for batch in (1, 2):
        x = torch.randn(batch, 4)
        assert compare_outputs(run(SqueezesOne(), x), run(dag, x))[0], batch


def test_an_export_dag_branching_on_batch_one_keeps_the_traced_batch():
    class BranchesOnOne(nn.Module):
        def forward(self, x):
            return x * 3 if x.shape[0] == 1 else x * 2

    dag = td.build_from_unstructured_module(BranchesOnOne(), torch.randn(1, 4), tracer="export")
    x = torch.randn(1, 4)
    assert compare_outputs(run(BranchesOnOne(), x), run(dag, x))[0]
    with pytest.raises(AssertionError, match="dimension 0"):  # refused, never silently the other branch
        run(dag, torch.ones(2, 4))


# --- torchvision ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "shufflenet_v2_x0_5",
        pytest.param("efficientnet_b0", marks=pytest.mark.slow),
        pytest.param("convnext_tiny", marks=pytest.mark.slow),
        pytest.param("vit_b_16", marks=pytest.mark.slow),
    ],
)
def test_torchvision_models_convert_without_inputs(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    dag = assert_equal_without_inputs(torchvision.models.get_model(name, weights=None))
    assert dag.input_meta["x"]["shape"] == [1, 3, 224, 224]


# --- Hugging Face default configs -----------------------------------------------------------------


def hf_model(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100)
        )
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(vocab_size=100, **small))
    if name == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, vocab_size=100, **small)
        return transformers.LlamaForCausalLM(config)
    if name == "t5":
        config = transformers.T5Config(
            num_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=128, vocab_size=100
        )
        return transformers.T5EncoderModel(config)
    return transformers.ViTModel(transformers.ViTConfig(**small))


def without_caches(output) -> dict:
    """A model's output fields that are not cache objects (the DAG gives None for those)."""
    return {k: v for k, v in output.items() if v is not None and not type(v).__name__.endswith("Cache")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "t5", "vit"])
@pytest.mark.parametrize("given", [False, True])
def test_hugging_face_default_configs_convert_and_run_at_batch_1_and_4(name, given):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_model(name).eval()
        if given and name == "vit":
            dag = td.build_from_unstructured_module(model, {"pixel_values": torch.randn(1, 3, 224, 224)})
        elif given:
            ids = torch.randint(0, 100, (1, 12))
            dag = td.build_from_unstructured_module(
                model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            )
        else:
            dag = td.build_from_unstructured_module(model)
        for batch in (1, 4):
            inputs = {n: torch.randn(batch, *dag.input_meta[n]["shape"][1:]) for n in dag.input_names}
            if "input_ids" in inputs:
                inputs["input_ids"] = torch.randint(0, 100, inputs["input_ids"].shape)
            if "attention_mask" in inputs:  # padding at the end of every sequence but the first
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                inputs["attention_mask"][1:, -3:] = 0
            reference, out = without_caches(run(model, **inputs)), run(dag, **inputs)
            assert {k for k, v in out.items() if v is not None} == set(reference)
            equal, worst, why = compare_outputs(reference, {k: out[k] for k in reference})
            assert equal, (batch, worst, why)


class MaskFill(nn.Module):
    """A mask filled with the dtype's lowest value (`torch.finfo(x.dtype).min`), as transformers do."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, mask):
        h = self.proj(x)
        scores = (h @ h.transpose(-1, -2)).masked_fill(mask[:, None, :] == 0, torch.finfo(h.dtype).min)
        return scores.softmax(-1)


def test_dtype_limits_are_constants_guarded_by_the_dtype(tmp_path):
    torch.manual_seed(0)
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    mask[0, -1] = 0
    model = MaskFill().eval()
    dag = td.load(td.save(td.build_from_unstructured_module(model, (x, mask)), tmp_path / "m.dag"))
    assert compare_outputs(run(model, x, mask), run(dag, x, mask))[0]
    with pytest.raises(RuntimeError, match=r"dtype .* was torch.float32 .* is torch.float64"):
        run(dag.double(), x.double(), mask)


class SplicedShape(nn.Module):
    """GPT-2's Conv1D: the output shape spliced from the input's sizes and a number."""

    def __init__(self):
        super().__init__()
        self.nf = 32
        self.weight = nn.Parameter(torch.randn(16, 32) / 4)
        self.bias = nn.Parameter(torch.zeros(32))
        self.out = nn.Linear(32, 16)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        h = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)
        return self.out(torch.relu(h))


def test_a_shape_spliced_from_sizes_and_a_number_reshapes_and_prunes():
    torch.manual_seed(0)
    model, x = SplicedShape().eval(), torch.randn(2, 5, 16)
    dag = td.build_from_unstructured_module(model, x)
    for inputs in (x, torch.randn(3, 7, 16)):
        assert compare_outputs(run(model, inputs), run(dag, inputs))[0]
    pruned = td.prune(dag, 0.6, x)
    (linear,) = [v for v in pruned if v.op == "Linear" and v.module.out_features == 16]
    assert linear.module.in_features < 32  # the hidden width pruned through the spliced view
    assert run(pruned, torch.randn(3, 7, 16)).shape == (3, 7, 16)


class ZeroedSlice(nn.Module):
    """torchvision's Swin V2: a slice of a cloned bias zeroed in place, the bias read afterwards."""

    def __init__(self, read_other_view: bool = False):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.read_other_view = read_other_view

    def forward(self, x):
        bias = self.qkv.bias.clone()
        length = bias.numel() // 3
        first = bias[:length]
        bias[length : 2 * length].zero_()
        out = torch.nn.functional.linear(x, self.qkv.weight, bias)
        out[:, 0].fill_(2.0)
        return out + first.sum() if self.read_other_view else out


def test_an_in_place_write_to_a_slice_is_written_back_into_its_base():
    torch.manual_seed(0)
    model, x = ZeroedSlice().eval(), torch.randn(2, 8)
    dag = td.build_from_unstructured_module(model, x)
    assert compare_outputs(run(model, x), run(dag, x))[0]
    assert [v.op for v in dag].count("index_put") == 2
    with pytest.raises(td.ConversionError, match="in-place update of a view of 'clone'"):
        td.build_from_unstructured_module(ZeroedSlice(read_other_view=True).eval(), x, tracer="fx")


class EncoderDecoder(nn.Module):
    """An encoder-decoder whose forward takes both streams as optional keywords and needs both."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.mix = nn.Linear(16, 16)

    def forward(self, input_ids=None, decoder_input_ids=None):
        if input_ids is None or decoder_input_ids is None:
            raise ValueError("give both input_ids and decoder_input_ids")
        memory = self.embed(input_ids).mean(1, keepdim=True)
        return self.mix(self.embed(decoder_input_ids) + memory)


def test_an_encoder_decoder_gets_its_decoder_stream_inferred_too():
    torch.manual_seed(0)
    dag = assert_equal_without_inputs(EncoderDecoder(), high=40)
    assert dag.input_names == ["input_ids", "decoder_input_ids"]


def test_the_example_call_for_token_ids_uses_ids():
    class OddLengths(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(40, 8)

        def forward(self, ids):
            if ids.shape[1] % 2 == 0:
                raise ValueError("odd lengths only")
            return self.embed(ids)

    with pytest.raises(td.ConversionError, match=r"torch\.randint\(0, 40, \(1, 16\)\)"):
        td.build_from_unstructured_module(OddLengths())


class WeightNormed(nn.Module):
    """A weight-norm parametrized grouped conv (speech models' positional conv) and a tensor_split."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.positional = nn.utils.parametrizations.weight_norm(
            nn.Conv1d(8, 8, 5, padding=2, groups=2), dim=2
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        h = h + self.positional(h)
        first, second = h.tensor_split(2, dim=1)
        token, rest = torch.tensor_split(h, indices=(1,), dim=2)  # torchvision's MViT spelling
        return self.head((first * second).mean(-1)) + token.mean() + rest.mean()


def test_a_parametrized_layer_is_traced_through_and_keeps_its_parameters(tmp_path):
    torch.manual_seed(0)
    model = WeightNormed().eval()
    dag = assert_equal_without_inputs(model)
    assert {"weight_norm", "tensor_split"} <= {v.op for v in dag}
    shared = {id(p) for p in dag.parameters()}
    assert all(id(p) in shared for p in model.positional.parametrizations.weight.parameters())
    x = torch.randn(2, 4, 30)
    assert compare_outputs(run(model, x), run(td.load(td.save(dag, tmp_path / "w.dag")), x))[0]
    pruned = td.prune(dag, 0.7, x)
    assert run(pruned, x).shape == (2, 3)


class CachesInADict(nn.Module):
    """Caches a value per device in a dict on itself in eval mode (LeViT's attention bias cache)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.bias = nn.Parameter(torch.randn(6))
        self.cache: dict = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # LeViT's rule: training invalidates the cache
            self.cache = {}
        return self

    def forward(self, x):
        if self.training:
            return self.proj(x) + self.bias
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.proj(x) + self.cache[key]


def test_a_dict_cache_on_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = CachesInADict().eval()
    for tracer in ("fx", "auto", "fx"):  # a conversion must not leave its trace for the next one
        before = dict(model.cache)
        dag = td.build_from_unstructured_module(model, tracer=tracer)  # guessing inputs runs it
        assert all(model.cache[k] is v for k, v in before.items()), tracer
        assert all(type(v) is torch.Tensor for v in model.cache.values()), (tracer, model.cache)
        x = torch.randn(3, 6)
        assert compare_outputs(run(model, x), run(dag, x))[0], tracer  # fills the cache, as eager does


class OwnLinear(nn.Linear):
    """A Linear subclass with its own forward (Falcon's): `x @ self.weight.T + self.bias`."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_a_matrix_product_with_a_transposed_weight_becomes_a_linear_that_prunes():
    torch.manual_seed(0)
    model = nn.Sequential(OwnLinear(8, 32), nn.ReLU(), OwnLinear(32, 4)).eval()
    x = torch.randn(3, 8)
    dag = td.build_from_unstructured_module(model, x)
    assert [v.op for v in dag].count("Linear") == 2
    assert compare_outputs(run(model, x), run(dag, x))[0]
    pruned = td.prune(dag, 0.5, x)
    assert next(v.module.out_features for v in pruned if v.op == "Linear") < 32
    assert run(pruned, x).shape == (3, 4)


class _HandWrittenFlex(td.flex.Module):
    """A flexible model written by hand: its first reader is a flexible layer (weights owned by the
    flexible module, not by the plain layer it wraps)."""

    def __init__(self):
        super().__init__()
        self.c1 = td.flex.Conv2d([3, 3, 3], [4, 8, 16], kernel_size=3, padding=1)
        self.c2 = td.flex.Conv2d([4, 8, 16], [8, 12, 16], kernel_size=3, padding=1)

    def forward(self, x):
        _, _, h, w = x.shape
        return self.c2(torch.relu(self.c1(x))).mean((2, 3)) * (h * w) ** 0.5


def test_a_flexible_first_layer_tells_the_input_shape():
    model = _HandWrittenFlex().eval()
    dag = td.build_from_unstructured_module(model)
    x = torch.randn(2, 3, 16, 16)
    for level in range(model.max_level() + 1):
        model.set_level_use(level)
        dag.set_level_use(level)
        torch.testing.assert_close(dag(x), model(x))
