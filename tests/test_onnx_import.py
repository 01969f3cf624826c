"""`graphc import` and `graphc.compile_onnx` on models torch.onnx.export writes: an MLP, the
PyTorch MNIST example CNN, a CNN with batch norm and a transformer encoder block. Forward against
PyTorch (1e-5 in f32), gradients against torch.autograd (1e-6, the models exported in f64), the
command line's files and errors, and the npz initializer's checks."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the ONNX import tests export models with torch "
                                            "(pip install -e '.[test]')")
pytest.importorskip("onnx")

import graphc  # noqa: E402
from graphc.cli import main  # noqa: E402
from graphc.compiler import check_source  # noqa: E402
from graphc.errors import GraphcError  # noqa: E402
from graphc.onnx.importer import sanitize  # noqa: E402

F = torch.nn.functional


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(48, 32), torch.nn.Linear(32, 10)

    def forward(self, x):   # x.view(x.size(0), -1): the Shape -> Gather -> ... -> Reshape chain
        return self.fc2(torch.tanh(self.fc1(x.view(x.size(0), -1))))


class MnistCNN(torch.nn.Module):
    """PyTorch's examples/mnist/main.py network."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, 1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = torch.nn.Dropout(0.25), torch.nn.Dropout(0.5)
        self.fc1, self.fc2 = torch.nn.Linear(9216, 128), torch.nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(x), dim=1)


class BatchNormCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 5)
        self.bn1 = torch.nn.BatchNorm1d(5)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.bn1(self.fc(x.view(x.size(0), -1)))


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)

    def forward(self, x):
        return self.block(x, is_causal=False)


def export(model, x, path, dynamic=True, **kw):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                          output_names=["out"], dynamic_axes={"x": {0: "batch"}, "out": {0: "batch"}}
                          if dynamic else None, **kw)
    return path


def randomize_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


CASES = {
    "mlp": (MLP, (5, 3, 4, 4), True, {}),
    "mnist_cnn": (MnistCNN, (3, 1, 28, 28), True, {}),
    # without constant folding torch keeps BatchNormalization (else it folds it into the conv)
    "bn_cnn": (BatchNormCNN, (4, 3, 8, 8), True, {"do_constant_folding": False}),
    # a static batch: torch's attention reshapes to [T, N*heads, D], a product with the batch
    # size that graphc's reshape cannot carry (it keeps a symbolic size whole)
    "encoder": (Encoder, (2, 5, 16), False, {}),
}


def build(name, tmp_path, dtype=torch.float32, seed=0):
    cls, shape, dynamic, kw = CASES[name]
    torch.manual_seed(seed)
    model = cls().to(dtype)
    randomize_stats(model)
    x = torch.randn(*shape, dtype=dtype)
    path = export(model, x, tmp_path / f"{name}.onnx", dynamic, **kw)
    return model, x, path


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_pytorch(name, backend, tmp_path):
    if backend == "llvm":
        pytest.importorskip("llvmlite")
    model, x, path = build(name, tmp_path)
    program = graphc.compile_onnx(path, backend=backend)
    with torch.no_grad():
        want = model(x).numpy()
    got = program.forward(x=x.numpy())["out"]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    if CASES[name][2]:   # the batch stays symbolic: another batch size runs too
        x2 = torch.randn(7, *x.shape[1:])
        with torch.no_grad():
            np.testing.assert_allclose(program.forward(x=x2.numpy())["out"], model(x2).numpy(),
                                       rtol=1e-5, atol=1e-5 * np.abs(want).max())


def torch_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.numpy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_autograd_in_f64(name, tmp_path):
    model, x, path = build(name, tmp_path, torch.float64)
    out_shape = model.eval()(x).shape
    rng = np.random.default_rng(1)
    if name in ("mlp", "mnist_cnn", "bn_cnn"):
        loss = "nll" if name == "mnist_cnn" else "cross_entropy"
        labels = rng.integers(0, out_shape[1], out_shape[0])
        feeds = {"labels": labels}
        model.train(name == "bn_cnn")    # dropout off (the export has none); batch norm in training
        out = model(x)
        t_loss = F.nll_loss(out, torch.from_numpy(labels)) if loss == "nll" else \
            F.cross_entropy(out, torch.from_numpy(labels))
    else:
        loss = "mse"
        target = rng.standard_normal(out_shape)
        feeds = {"target": target}
        model.eval()     # its dropout is not in the export
        t_loss = F.mse_loss(model(x), torch.from_numpy(target))
    want = torch_grads(model, t_loss)
    program = graphc.compile_onnx(path, loss=loss)
    got_loss, grads = program.loss_and_grads(x=x.numpy(), **feeds)
    assert abs(got_loss - t_loss.item()) <= 1e-9 * max(1.0, abs(t_loss.item()))
    checked = 0
    for tname, g in want.items():
        mine = grads[sanitize(tname)]
        if g.ndim == 2:
            mine = mine.T           # linear weights: graphc stores [in, out], PyTorch [out, in]
        np.testing.assert_allclose(mine, g, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(g).max()),
                                   err_msg=tname)
        checked += 1
    assert checked == len(want) >= 4


def test_the_written_model_reads_like_the_network(tmp_path, capsys):
    _, _, path = build("mnist_cnn", tmp_path)
    out = tmp_path / "imported"
    assert main(["import", str(path), "-o", str(out), "--loss", "nll", "--data", "mnist"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mnist_cnn.nn", "mnist_cnn.npz"]
    text = (out / "mnist_cnn.nn").read_text()
    body = [line.strip() for line in text.splitlines()]
    assert "input x: f32[N, 1, 28, 28]" in body and "input labels: i64[N]" in body
    assert 'param conv1_weight: f32[32, 1, 3, 3] = npz("mnist_cnn.npz")' in body
    assert 'param fc1_weight: f32[9216, 128] = npz("mnist_cnn.npz")' in body
    ops = [re.sub(r"\(.*", "", line.split(" = ", 1)[1]) for line in body
           if " = " in line and not line.startswith(("param", "data", "optimizer", "batch",
                                                      "epochs", "seed", "loss"))]
    assert ops == ["conv2d", "relu", "conv2d", "relu", "max_pool2d", "flatten", "linear", "relu",
                   "linear", "log_softmax"]
    assert "loss = nll(out, labels)" in body and "data      = mnist" in body
    assert main(["check", str(out / "mnist_cnn.nn")]) == 0
    capsys.readouterr()


def test_shape_arithmetic_folds_into_a_plain_reshape(tmp_path):
    _, _, path = build("mlp", tmp_path)
    import onnx
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= ops
    from graphc.onnx.import_cli import import_file
    text = import_file(path).source
    assert "reshape(x, [N, 48])" in text
    assert text.count(" = ") == 4 + 4     # 4 params; reshape, linear, tanh, linear: a line each


def test_fine_tuning_moves_batch_norm_statistics_as_pytorch_does(tmp_path):
    model, x, path = build("bn_cnn", tmp_path, torch.float64)
    program = graphc.compile_source(_imported_with_train_block(path, tmp_path),
                                    path=str(tmp_path / "bn_cnn.nn"))
    labels = np.array([0, 1, 2, 3])
    model.train()
    with torch.no_grad():
        model(x)       # one training-mode pass moves PyTorch's running estimates
    program.train_step(x=x.numpy(), labels=labels)
    for name in ("bn.running_mean", "bn.running_var", "bn1.running_mean", "bn1.running_var"):
        np.testing.assert_allclose(program.params[sanitize(name)], model.state_dict()[name].numpy(),
                                   rtol=1e-6, err_msg=name)


def _imported_with_train_block(path, folder) -> str:
    from graphc.onnx.import_cli import import_file, write_imported
    imported = import_file(path, "cross_entropy", "digits")
    return write_imported(imported, folder).read_text()


def test_an_imported_model_trains(tmp_path):
    _, x, path = build("mlp", tmp_path)
    program = graphc.compile_onnx(path, loss="cross_entropy")
    labels = np.arange(5) % 10
    program.lr = 1e-2          # the skeleton's adam(lr=1e-4) is for fine-tuning
    losses = [program.train_step(x=x.numpy(), labels=labels) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def onnx_model(nodes, inputs, outputs, initializers=()):
    from onnx import helper
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)))


def test_unsupported_ops_are_one_message_each_and_exit_1(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Selu", ["x"], ["a"], name="s1"),
             helper.make_node("Conv", ["a", "w"], ["b"], name="c1", auto_pad="VALID", foo=1),
             helper.make_node("Selu", ["b"], ["y"], name="s2")]
    path = tmp_path / "bad.onnx"
    onnx.save(onnx_model(nodes, [x], [y]), str(path))
    assert main(["import", str(path), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 2
    assert "ONNX op Selu is not supported: graphc lacks the op itself (2 nodes: s1, s2)" in err
    assert "ONNX op Conv is not supported: graphc lacks the attribute foo (1 node: c1)" in err
    assert not (tmp_path / "out").exists()


def test_bad_files_are_refused(tmp_path, capsys):
    from onnx import TensorProto, helper, numpy_helper
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    assert main(["import", str(junk), "-o", str(tmp_path / "o1")]) == 1
    assert "not a readable ONNX model" in capsys.readouterr().err
    # external data that points out of the model's folder
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    del w.external_data[:]
    w.external_data.add(key="location", value="../secret.bin")
    w.ClearField("raw_data")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    inner = tmp_path / "models"
    inner.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    path = inner / "ext.onnx"
    path.write_bytes(onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [y],
                                [w]).SerializeToString())
    assert main(["import", str(path), "-o", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert "outside the model's folder" in err and "Traceback" not in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


NPZ_MODEL = """model m {{
    input x: f32[N, 3]
    param W: f32[3, 2] = npz({args})
    output y = x @ W
}}
"""


def npz_error(tmp_path, args: str, arrays=None) -> str:
    np.savez(tmp_path / "w.npz", **(arrays or {"W": np.ones((3, 2), np.float32)}))
    nn = tmp_path / "m.nn"
    nn.write_text(NPZ_MODEL.format(args=args))
    with pytest.raises(GraphcError) as err:
        graphc.compile_file(nn)
    return err.value.render()


def test_the_npz_initializer_reads_the_named_array(tmp_path):
    np.savez(tmp_path / "w.npz", W=np.arange(6, dtype=np.float32).reshape(3, 2),
             other=np.ones((3, 2), np.float32))
    nn = tmp_path / "m.nn"
    nn.write_text(NPZ_MODEL.format(args='"w.npz"'))
    assert graphc.compile_file(nn).params["W"].tolist() == [[0, 1], [2, 3], [4, 5]]
    nn.write_text(NPZ_MODEL.format(args='"w.npz", key="other"'))
    assert graphc.compile_file(nn).params["W"].tolist() == [[1, 1]] * 3


def test_the_npz_initializer_checks_what_it_reads(tmp_path):
    err = npz_error(tmp_path, '"w.npz"', {"W": np.ones((2, 3), np.float32)})
    assert "m.nn:3:5: error: param W: npz(\"w.npz\"): array 'W' should be float32[3, 2], found " \
           "float32[2, 3]" in err and "^~~" in err
    err = npz_error(tmp_path, '"w.npz"', {"W": np.ones((3, 2), np.float64)})
    assert "should be float32[3, 2], found float64[3, 2]" in err
    assert "array 'V' is missing" in npz_error(tmp_path, '"w.npz", "V"')
    err = npz_error(tmp_path, '"w.npz"', {"W": np.array([None] * 6, dtype=object).reshape(3, 2)})
    assert "m.nn:3:5" in err and "Traceback" not in err
    assert "without '..'" in npz_error(tmp_path, '"../w.npz"')
    assert "without '..'" in npz_error(tmp_path, '"/tmp/w.npz"')
    assert "must be a string" in npz_error(tmp_path, "3")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    np.savez(outside / "x.npz", W=np.ones((3, 2), np.float32))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link.npz").symlink_to(outside / "x.npz")
    (tmp_path / "sub" / "m.nn").write_text(NPZ_MODEL.format(args='"link.npz"'))
    with pytest.raises(GraphcError) as err:
        graphc.compile_file(tmp_path / "sub" / "m.nn")
    assert "leads outside the .nn file's folder" in err.value.render()


def test_the_build_cache_keys_npz_archives_beside_the_file(tmp_path):
    from graphc import build_cache
    options = {name: None for name in build_cache.BUILD_OPTIONS} | {"backend": "numpy"}
    np.savez(tmp_path / "w.npz", W=np.ones((3, 2), np.float32))
    source = NPZ_MODEL.format(args='"w.npz"').encode()
    before = build_cache.build_key(str(tmp_path / "m.nn"), source, options)
    np.savez(tmp_path / "w.npz", W=np.zeros((3, 2), np.float32))
    assert build_cache.build_key(str(tmp_path / "m.nn"), source, options) != before


BN_MODEL = """model m {{
    input x: f32[N, 3]
    param g: f32[3] = ones()
    param b: f32[3] = zeros()
    param mu: f32[{n}] = zeros()
    param var: f32[3] = ones(){role}
    output y = {call}
}}
"""


def test_batchnorm_with_declared_parameters(tmp_path):
    checked = check_source(BN_MODEL.format(n=3, role="", call="batchnorm(x, g, b, mu, var)"))
    assert {n: p.role for n, p in checked.models["m"].params.items()} == {
        "g": "other", "b": "bias", "mu": "stat", "var": "stat"}
    assert set(checked.models["m"].stats) == {"mu", "var"}
    for n, role, call, message in [
            (4, "", "batchnorm(x, g, b, mu, var)", "running_mean must be a declared parameter of "
                                                   "type f32[3]: mu is f32[4]"),
            (3, "", "batchnorm(x, g, b, mu * 2, var)", "must be a declared parameter"),
            (3, " as weight", "batchnorm(x, g, b, mu, var)", "var is the stat parameter of a layer "
                                                             "here, but it is declared weight"),
            (3, "", "batchnorm(x, g, b)", "or the input and four declared parameters")]:
        with pytest.raises(GraphcError) as err:
            check_source(BN_MODEL.format(n=n, role=role, call=call), "m.nn")
        assert message in err.value.render() and "m.nn:7:" in err.value.render()


def test_a_size_that_multiplies_the_batch_is_refused_clearly(tmp_path):
    torch.manual_seed(0)
    path = export(Encoder(), torch.randn(2, 5, 16), tmp_path / "dyn.onnx", dynamic=True)
    with pytest.raises(GraphcError) as err:
        graphc.compile_onnx(path)
    text = err.value.render()
    assert "dyn.onnx: error: Mul node '/block/self_attn/Mul'" in text
    assert "export with a fixed batch size" in text and len(text.splitlines()) == 1


def test_external_data_inside_the_folder_is_read(tmp_path):
    import onnx
    model, x, path = build("mlp", tmp_path)
    proto = onnx.load(str(path))
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(proto, str(folder / "mlp.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    assert (folder / "weights.bin").stat().st_size > 0
    with torch.no_grad():
        want = model(x).numpy()
    got = graphc.compile_onnx(folder / "mlp.onnx").forward(x=x.numpy())["out"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
