"""``rotate``: an exact orthogonal change of basis of an RMSNorm transformer's residual stream.

QuaRot (Ashkboos et al., 2024) and SpinQuant call it R1; QuIP calls its effect
incoherence. A pre-norm decoder (Llama, SmolLM2) keeps a residual stream ``h`` that only
embeddings and the output projections (``o_proj``, ``down_proj``) write, and that only
RMSNorms read. With an orthogonal ``Q`` (``Q Qᵀ = I``) every layer can work on ``hQ``
instead of ``h`` and compute the same function:

* RMSNorm: ``rms(hQ) = rms(h)``, so ``norm(hQ) = norm(h) Q`` once gamma is folded into
  the linear layers that read the norm (``W ← diag(gamma) W``, gamma set to ones);
* readers of a norm (``q/k/v``, ``gate/up``, in ``x @ W`` form): ``W ← Qᵀ diag(gamma) W``;
* writers (``o_proj``, ``down_proj``, biases added to the stream): ``W ← W Q``, ``b ← b Q``;
* an embedding table that nothing else shares: ``E ← E Q``.

Where a weight cannot take ``Q`` without changing something else, the pass keeps the
function exact with an online ``MatMul`` by ``Q`` (after the writer) or ``Qᵀ`` (before
the norm) instead. The case that matters: an embedding table **tied** to the LM head.
Rotating both copies would store the table twice, so the table stays as it is, ``Q`` is
applied after the lookup and ``Qᵀ`` before the final norm: two ``d x d`` products per
token, left in float (the weight passes skip them, see
:data:`qcompile.passes.layers.ROTATION_PREFIX`).

Why: after the rotation a weight's rows mix every channel of the stream, so its outlier
channels are spread over all of them and low-bit grids fit it far better. ``Q`` is a
random Hadamard matrix ``diag(±1) H / sqrt(d)`` (QuaRot's choice; Sylvester and Paley
constructions, ``d = 2^k (q + 1)`` with ``q`` a prime ``≡ 3 mod 4``), or a random
orthogonal matrix when no Hadamard order fits ``d`` or with ``kind=random``.

Anything that reads the stream other than norms, residual adds and ``Shape`` (a graph
output of hidden states, say) makes the pass leave the model alone and say why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir.model import Model

from .base import Pass, PassResult, option
from .context import PassContext
from .fold import tied_heads
from .layers import ROTATION_PREFIX
from .patterns import RMSNorm, rmsnorms, swiglus

ROTATED = "qcompile.rotated"  # model metadata: the spec of the rotation already applied


@dataclass(frozen=True)
class Rotate(Pass):
    """Rotate the residual stream of an RMSNorm transformer (exact; spreads weight outliers)."""

    name: ClassVar[str] = "rotate"
    summary: ClassVar[str] = ("exact: rotate an RMSNorm transformer's residual stream by a random Hadamard "
                              "matrix (QuaRot R1), spreading outlier channels before low-bit passes")
    exact: ClassVar[bool] = True

    kind: str = option("hadamard", "hadamard = random-sign Hadamard (random orthogonal when no Hadamard "
                       "order fits the width); random = random orthogonal", choices=("hadamard", "random"))
    seed: int = option(0, "seed of the random signs / random matrix", min=0)
    down: int = option(0, "also rotate each SwiGLU down projection's input online by a block-diagonal random "
                       "Hadamard of this block size (QuaRot R4; 4 small ops per MLP); 0 = off",
                       choices=(0, 16, 32, 64, 128, 256))

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ROTATED in model.metadata:
            return PassResult(False, {"skipped": f"already rotated ({model.metadata[ROTATED]})"})
        found = find_stream(model.graph)
        if isinstance(found, str):
            return PassResult(False, {"skipped": found})
        rotation, construction = orthogonal(found.width, self.kind, self.seed)
        stats = apply_rotation(model, found, rotation)
        if self.down:
            stats["down"] = rotate_down_projections(model, self.down, self.seed)
        model.metadata[ROTATED] = f"{self} {construction}"
        model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(True, {"width": found.width, "rotation": construction, **stats})


# --- the residual stream ---------------------------------------------------------------------

@dataclass
class Stream:
    """What reads and writes a residual stream of width ``width``."""

    width: int
    norms: list[RMSNorm]
    tensors: list[gs.Tensor]  # every tensor that holds the stream (or a branch written into it)
    writers: list[gs.Node] = field(default_factory=list)  # MatMul [in, width] / Gather [vocab, width]
    biases: list[tuple[gs.Node, int]] = field(default_factory=list)  # (Add, index of its constant bias)


def find_stream(graph: gs.Graph) -> Stream | str:
    """The residual stream that the RMSNorms of ``graph`` read, or why it cannot be rotated."""
    norms = rmsnorms(graph)
    if not norms:
        return "no RMSNorm: rotation needs a pre-norm (RMSNorm) residual stream"
    widths = {int(np.asarray(n.gamma.values).size) for n in norms}
    if len(widths) != 1:
        return f"RMSNorms of different widths {sorted(widths)}: more than one stream"
    width = widths.pop()
    stream = Stream(width, norms, [])
    seen: set[int] = set()
    todo = [n.source for n in norms]
    adds: set[int] = set()
    while todo:
        tensor = todo.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        stream.tensors.append(tensor)
        if len(tensor.inputs) != 1:
            return f"the residual stream starts at graph input {tensor.name!r}"
        producer = tensor.inputs[0]
        constants = [i for i, t in enumerate(producer.inputs) if isinstance(t, gs.Constant)]
        if producer.op == "Add" and len(producer.inputs) == 2 and not constants:
            adds.add(id(producer))
            todo.extend(producer.inputs)
        elif producer.op == "Add" and len(producer.inputs) == 2 and len(constants) == 1 \
                and _is_row_vector(producer.inputs[constants[0]], width):
            adds.add(id(producer))
            stream.biases.append((producer, constants[0]))
            todo.append(producer.inputs[1 - constants[0]])
        elif producer.op == "MatMul" and _is_matrix(producer.inputs[1], cols=width):
            stream.writers.append(producer)
        elif producer.op == "Gather" and producer.attrs.get("axis", 0) == 0 \
                and _is_matrix(producer.inputs[0], cols=width):
            stream.writers.append(producer)
        else:
            return f"the residual stream is written by {producer.op} {producer.name!r}"
    readers = {id(node) for norm in norms for node in _norm_readers(norm)}
    outputs = {id(t) for t in graph.outputs}
    for tensor in stream.tensors:
        if id(tensor) in outputs:
            return f"stream tensor {tensor.name!r} is a graph output"
        for consumer in tensor.outputs:
            if id(consumer) not in adds and id(consumer) not in readers and consumer.op != "Shape":
                return f"the residual stream is read by {consumer.op} {consumer.name!r}"
    return stream


def _norm_readers(norm: RMSNorm) -> list[gs.Node]:
    """The nodes of ``norm`` that read its source: the normalising Mul/Div and the Pow of its mean square."""
    normalised = norm.scale.inputs[1 - norm.gamma_index]
    normalise = normalised.inputs[0]
    found = [normalise]
    frontier = [t for t in normalise.inputs if t is not norm.source]
    for _ in range(6):  # Reciprocal/Div, Sqrt, Add(eps), ReduceMean, Pow
        nodes = [t.inputs[0] for t in frontier if len(t.inputs) == 1]
        found += [n for n in nodes if n.op == "Pow" and n.inputs[0] is norm.source]
        frontier = [t for n in nodes if n.op != "Pow" for t in n.inputs if not isinstance(t, gs.Constant)]
    return found


def _is_matrix(tensor: gs.Tensor, *, rows: int | None = None, cols: int | None = None) -> bool:
    """A constant 2-D weight, of ``rows`` rows and ``cols`` columns where given."""
    if not isinstance(tensor, gs.Constant) or len(tensor.shape or ()) != 2:
        return False
    return rows in (None, tensor.shape[0]) and cols in (None, tensor.shape[1])


def _is_row_vector(tensor: gs.Tensor, width: int) -> bool:
    shape = tuple(tensor.shape or ())
    return isinstance(tensor, gs.Constant) and shape[-1:] == (width,) and int(np.prod(shape)) == width


# --- applying Q ----------------------------------------------------------------------------

def apply_rotation(model: Model, stream: Stream, rotation: np.ndarray) -> dict:
    """Rotate ``stream`` by ``rotation`` in place (offline where a weight can take it, online where not)."""
    heads = tied_heads(model.graph)  # LM head -> the embedding table it equals
    head_weights = {id(n.inputs[1]) for n in model.graph.nodes if n.name in heads}
    tied_tables = {id(table) for table in heads.values()}
    online: list[str] = []
    constants: dict[str, gs.Constant] = {}

    def online_matrix(label: str, values: np.ndarray) -> gs.Constant:
        return constants.setdefault(label, gs.Constant(f"{ROTATION_PREFIX}{label}", values.astype(np.float32)))

    writers = 0
    for writer in stream.writers:
        weight = writer.inputs[0 if writer.op == "Gather" else 1]
        shared = len(weight.outputs) != 1 or (writer.op == "Gather" and id(weight) in tied_tables)
        if shared:  # keep the weight as it is; rotate what it writes
            out = writer.outputs[0]
            rotated = gs.Variable(f"{out.name}.rotated", np.float32)
            node = gs.Node("MatMul", f"{writer.name}/rotate", inputs=[out, online_matrix("q", rotation)],
                           outputs=[rotated])
            model.splice([node], [c for c in list(out.outputs) if c is not node], out, rotated, "rotate")
            online.append(f"after {writer.op} {writer.name}")
        else:
            weight.values = (np.asarray(weight.values, np.float32) @ rotation).astype(np.float32)
            writers += 1
    for add, index in stream.biases:
        bias = add.inputs[index]
        values = np.asarray(bias.values, np.float32)
        add.inputs[index] = gs.Constant(f"{bias.name}.rotated",
                                        (values.reshape(-1) @ rotation).reshape(values.shape).astype(np.float32))
    readers = 0
    for norm in stream.norms:
        consumers = list(norm.output.outputs)
        foldable = consumers and all(
            c.op == "MatMul" and c.inputs[0] is norm.output and _is_matrix(c.inputs[1], rows=stream.width)
            and len(c.inputs[1].outputs) == 1 and id(c.inputs[1]) not in head_weights
            for c in consumers)
        if foldable:
            gamma = np.asarray(norm.gamma.values, np.float32)
            for consumer in consumers:
                weight = consumer.inputs[1]
                weight.values = (rotation.T @ (gamma[:, None] * np.asarray(weight.values, np.float32))
                                 ).astype(np.float32)
                readers += 1
            norm.scale.inputs[norm.gamma_index] = gs.Constant(f"{norm.gamma.name}.folded",
                                                              np.ones_like(gamma))
        else:  # undo Q before this norm: gamma and whatever reads it stay as they are
            source = norm.source
            plain = gs.Variable(f"{source.name}.unrotated", np.float32)
            node = gs.Node("MatMul", f"{norm.scale.name}/unrotate",
                           inputs=[source, online_matrix("q_t", np.ascontiguousarray(rotation.T))], outputs=[plain])
            model.splice([node], _norm_readers(norm), source, plain, "rotate")
            online.append(f"before RMSNorm {norm.scale.name}")
    return {"matched": {"RMSNorm": len(stream.norms)}, "readers_rotated": readers, "writers_rotated": writers,
            "biases_rotated": len(stream.biases), "online": online}


def rotate_down_projections(model: Model, block: int, seed: int) -> dict:
    """``p -> p R`` before every SwiGLU down projection, ``W_down -> Rᵀ W_down``, with ``R`` block-diagonal
    (one random-sign Hadamard ``block x block`` repeated): online, since ``p`` is a product of two branches."""
    rotation, _ = orthogonal(block, "hadamard", seed + 1)  # every power of two is a Sylvester order
    rotation = rotation.astype(np.float32)
    constant = gs.Constant(f"{ROTATION_PREFIX}down{block}", rotation)
    rotated, skipped = [], {}
    for mlp in swiglus(model.graph):
        product, down = mlp.product.outputs[0], mlp.down
        weight = down.inputs[1]
        width = int(weight.shape[0])
        if list(product.outputs) != [down] or len(weight.outputs) != 1 or width % block:
            skipped[down.name] = ("its input has other readers" if list(product.outputs) != [down] else
                                  "its weight is shared" if len(weight.outputs) != 1 else
                                  f"input width {width} is not a multiple of {block}")
            continue
        values = np.asarray(weight.values, np.float32).reshape(width // block, block, -1)
        weight.values = np.einsum("ji,njk->nik", rotation, values).reshape(width, -1).astype(np.float32)
        name = f"{down.name}/rotate"
        shape = gs.Variable(f"{product.name}.shape", np.int64)
        blocks = gs.Variable(f"{product.name}.blocks", np.float32)
        mixed = gs.Variable(f"{product.name}.blocks_rotated", np.float32)
        out = gs.Variable(f"{product.name}.rotated", np.float32)
        split = gs.Constant(f"{name}.split_shape", np.array([-1, width // block, block], np.int64))
        nodes = [gs.Node("Shape", f"{name}/shape", inputs=[product], outputs=[shape]),
                 gs.Node("Reshape", f"{name}/blocks", inputs=[product, split], outputs=[blocks]),
                 gs.Node("MatMul", f"{name}/mix", inputs=[blocks, constant], outputs=[mixed]),
                 gs.Node("Reshape", f"{name}/back", inputs=[mixed, shape], outputs=[out])]
        model.splice(nodes, [down], product, out, "rotate")
        rotated.append(down.name)
    return {"block": block, "rotated": len(rotated), "skipped": skipped}


# --- orthogonal matrices ----------------------------------------------------------------------

def orthogonal(width: int, kind: str, seed: int) -> tuple[np.ndarray, str]:
    """A ``width x width`` orthogonal matrix (float64) and how it was built."""
    rng = np.random.default_rng(seed)
    if kind == "hadamard":
        found = hadamard(width)
        if found is not None:
            matrix, construction = found
            signs = rng.choice([-1.0, 1.0], size=width)
            return signs[:, None] * matrix / np.sqrt(width), f"random-sign Hadamard {construction}"
    q, r = np.linalg.qr(rng.standard_normal((width, width)))
    return q * np.sign(np.diag(r)), "random orthogonal (QR)" + (
        f": no Hadamard order construction for {width}" if kind == "hadamard" else "")


def hadamard(order: int) -> tuple[np.ndarray, str] | None:
    """A ``±1`` Hadamard matrix ``H`` (``H Hᵀ = order I``) by Sylvester ⊗ Paley I, or None."""
    power = 1
    while order % power == 0 and power <= order:
        rest = order // power
        core = np.ones((1, 1)) if rest == 1 else _paley(rest - 1)
        if core is not None:
            matrix = core
            while matrix.shape[0] < order:
                matrix = np.block([[matrix, matrix], [matrix, -matrix]])
            return matrix, f"{power}x{rest}" if rest > 1 else f"{order} (Sylvester)"
        power *= 2
    return None


def _paley(q: int) -> np.ndarray | None:
    """Paley's construction I of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``, else None."""
    if q < 3 or q % 4 != 3 or any(q % f == 0 for f in range(2, int(q ** 0.5) + 1)):
        return None
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)], float)
    jacobsthal = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    skew = np.zeros((q + 1, q + 1))
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return np.eye(q + 1) + skew
