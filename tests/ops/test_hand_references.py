"""Op rules against references built by hand: the same network with the dropped channels sliced
out of every tensor, compared with what structprune produces (plus all the oracle checks)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import assert_rule, randomize_

from .helpers import copy_sliced


def f64(m):
    return randomize_(m).double().eval()


def test_conv_bn_conv():
    model = f64(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"0": [1, 5]})
    keep = torch.tensor([0, 2, 3, 4, 6, 7])
    ref = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3))
    copy_sliced(ref.double().eval(), model, {
        "0.weight": (0, keep), "0.bias": (0, keep), "1.weight": (0, keep), "1.bias": (0, keep),
        "1.running_mean": (0, keep), "1.running_var": (0, keep), "3.weight": (1, keep)})
    torch.testing.assert_close(pruned(x), ref(x))
    assert pruned.get_submodule("0").out_channels == 6 and pruned.get_submodule("3").in_channels == 6


def test_group_norm_drops_whole_groups():
    model = f64(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"0": [2]})  # channel 2 takes its group (2, 3) along
    keep = torch.tensor([0, 1, 4, 5, 6, 7])
    ref = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(3, 6), nn.ReLU(), nn.Conv2d(6, 4, 3))
    copy_sliced(ref.double().eval(), model, {"0.weight": (0, keep), "0.bias": (0, keep),
                                            "1.weight": (0, keep), "1.bias": (0, keep),
                                            "3.weight": (1, keep)})
    torch.testing.assert_close(pruned(x), ref(x))


def test_grouped_conv_drops_whole_groups():
    model = f64(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4),
                              nn.ReLU(), nn.Conv2d(8, 2, 1)))
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"2": [6]})  # group 3: channels 6, 7 in and out
    keep = torch.tensor([0, 1, 2, 3, 4, 5])
    ref = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=3), nn.ReLU(),
                        nn.Conv2d(6, 2, 1))
    copy_sliced(ref.double().eval(), model, {"0.weight": (0, keep), "0.bias": (0, keep),
                                            "2.weight": (0, keep), "2.bias": (0, keep),
                                            "4.weight": (1, keep)})
    torch.testing.assert_close(pruned(x), ref(x))
    assert pruned.get_submodule("2").groups == 3


def test_depthwise_conv_ties_input_and_output():
    model = f64(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1)))
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"0": [1]})
    keep_in, keep_out = torch.tensor([0, 2, 3]), torch.tensor([0, 1, 4, 5, 6, 7])
    ref = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 6, 3, groups=3), nn.Conv2d(6, 2, 1))
    copy_sliced(ref.double().eval(), model, {"0.weight": (0, keep_in), "0.bias": (0, keep_in),
                                            "1.weight": (0, keep_out), "1.bias": (0, keep_out),
                                            "2.weight": (1, keep_out)})
    torch.testing.assert_close(pruned(x), ref(x))


def test_conv_transpose():
    model = f64(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ConvTranspose2d(6, 5, 2, stride=2),
                              nn.ReLU(), nn.Conv2d(5, 2, 1)))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"0": [0], "1": [4]})
    k0, k1 = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 3])
    ref = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ConvTranspose2d(5, 4, 2, stride=2), nn.ReLU(),
                        nn.Conv2d(4, 2, 1))
    copy_sliced(ref.double().eval(), model, {"0.weight": (0, k0), "0.bias": (0, k0),
                                            "1.weight": [(0, k0), (1, k1)], "1.bias": (0, k1),
                                            "3.weight": (1, k1)})
    torch.testing.assert_close(pruned(x), ref(x))


class ResidualCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        y = self.a(x) + self.b(x)  # a and b are tied by the add
        z = torch.cat([y, F.relu(self.c(x))], dim=1)  # [B, 8, H, W]
        return self.head(torch.flatten(F.adaptive_avg_pool2d(z, 4), 1))


def test_add_cat_flatten_linear():
    model = f64(ResidualCat())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"a": [1], "c": [0, 3]})
    ka, kc = torch.tensor([0, 2, 3]), torch.tensor([1, 2])
    cols = torch.cat([torch.arange(16 * c, 16 * c + 16) for c in [0, 2, 3, 5, 6]])
    ref = ResidualCat()
    ref.a, ref.b, ref.c = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 2, 1)
    ref.head = nn.Linear(5 * 16, 3)
    copy_sliced(ref.double().eval(), model, {
        "a.weight": (0, ka), "a.bias": (0, ka), "b.weight": (0, ka), "b.bias": (0, ka),
        "c.weight": (0, kc), "c.bias": (0, kc), "head.weight": (1, cols)})
    torch.testing.assert_close(pruned(x), ref(x))


class Halves(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.left, self.right = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.left(a) + self.right(b)


def test_chunk_becomes_split_with_unequal_sizes():
    model = f64(Halves())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"conv": [0, 1, 6]})
    assert ".split([2, 3], 1)" in pruned.code and ".chunk(" not in pruned.code
    keep = torch.tensor([2, 3, 4, 5, 7])
    got = pruned(x)
    w = model.conv.weight[keep]
    y = F.conv2d(x, w, model.conv.bias[keep])
    ref = F.conv2d(y[:, :2], model.left.weight[:, [2, 3]], model.left.bias) + F.conv2d(
        y[:, 2:], model.right.weight[:, [0, 1, 3]], model.right.bias)
    torch.testing.assert_close(got, ref)


class Heads(nn.Module):
    def __init__(self, e=12, h=3):
        super().__init__()
        self.h = h
        self.qkv, self.proj = nn.Linear(e, 3 * e), nn.Linear(e, e)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, e // self.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, -1))


def test_attention_heads_removed_whole():
    model = f64(Heads())
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"qkv": [4]})  # channel 4 of q is in head 1 (4..7)
    rows = torch.tensor([i for part in range(3) for i in range(part * 12, part * 12 + 12)
                         if not 4 <= i - part * 12 < 8])
    cols = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    ref = Heads(e=8, h=2)
    ref.qkv, ref.proj = nn.Linear(12, 24), nn.Linear(8, 12)
    copy_sliced(ref.double().eval(), model, {"qkv.weight": (0, rows), "qkv.bias": (0, rows),
                                            "proj.weight": (1, cols)})
    # The reference's forward computes head_dim = e // h from the input width, which stays 12;
    # recompute by hand with the kept weights instead.
    b, t, e = x.shape
    qkv = F.linear(x, ref.qkv.weight, ref.qkv.bias).reshape(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
    q, k, v = qkv
    a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    want = F.linear((a @ v).transpose(1, 2).reshape(b, t, -1), ref.proj.weight, ref.proj.bias)
    torch.testing.assert_close(pruned(x), want)


def test_channel_shuffle_drops_one_index_of_every_group():
    model = f64(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ChannelShuffle(2), nn.Conv2d(8, 2, 1)))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"0": [1]})  # index 1 of each group of 4: channels 1, 5
    keep = torch.tensor([0, 2, 3, 4, 6, 7])
    # After the shuffle, input channel i*4 + j sits at j*2 + i: kept inputs land on 0,4,6,1,5,7.
    shuffled = torch.tensor([0, 1, 4, 5, 6, 7])
    y = F.conv2d(x, model[0].weight[keep], model[0].bias[keep])
    y = F.channel_shuffle(y, 2)
    want = F.conv2d(y, model[2].weight[:, shuffled], model[2].bias)
    torch.testing.assert_close(pruned(x), want)


def test_pixel_shuffle_drops_a_block_of_r_squared():
    model = f64(nn.Sequential(nn.Conv2d(3, 8, 1), nn.PixelShuffle(2), nn.Conv2d(2, 3, 1)))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"0": [5]})  # channels 4..7 are output channel 1
    keep = torch.tensor([0, 1, 2, 3])
    y = F.pixel_shuffle(F.conv2d(x, model[0].weight[keep], model[0].bias[keep]), 2)
    want = F.conv2d(y, model[2].weight[:, [0]], model[2].bias)
    torch.testing.assert_close(pruned(x), want)


class Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.post = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.post(self.conv(x)[:, 4:7])


def test_slice_bounds_are_rewritten():
    model = f64(Sliced())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"conv": [1, 2, 5]})  # 5 is inside the slice
    assert "slice(2, 4, None)" in pruned.code  # 4:7 minus the dropped 1, 2 before and 5 inside
    keep = torch.tensor([0, 3, 4, 6, 7])
    y = F.conv2d(x, model.conv.weight[keep], model.conv.bias[keep])[:, 2:4]
    want = F.conv2d(y, model.post.weight[:, [0, 2]], model.post.bias)
    torch.testing.assert_close(pruned(x), want)


def test_embedding_width():
    model = nn.Sequential(nn.Embedding(10, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    ids = torch.randint(0, 10, (2, 5))
    pruned = assert_rule(model, ids, drop={"0": [0, 4]})
    keep = torch.tensor([1, 2, 3, 5])
    want = F.linear(F.relu(F.embedding(ids, model[0].weight[:, keep])), model[2].weight[:, keep],
                    model[2].bias)
    torch.testing.assert_close(pruned(ids), want)
    assert pruned.get_submodule("0").embedding_dim == 4


def _kept(n, dropped):
    return torch.tensor([i for i in range(n) if i not in dropped])


def test_prelu_pool_pad_per_channel():
    model = f64(nn.Sequential(nn.Conv2d(3, 6, 3), nn.PReLU(6), nn.MaxPool2d(2), nn.ZeroPad2d(1),
                              nn.AdaptiveAvgPool2d(2), nn.Conv2d(6, 2, 1)))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"0": [0, 3]})
    k = _kept(6, {0, 3})
    y = F.prelu(F.conv2d(x, model[0].weight[k], model[0].bias[k]), model[1].weight[k])
    y = F.adaptive_avg_pool2d(F.pad(F.max_pool2d(y, 2), (1, 1, 1, 1)), 2)
    torch.testing.assert_close(pruned(x), F.conv2d(y, model[5].weight[:, k], model[5].bias))


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 1), nn.Linear(6, 2)

    def forward(self, x):
        y = self.conv(x)
        y = y * y.amax((2, 3), keepdim=True).expand_as(y)  # reduction over space + expand
        return self.fc(y.permute(0, 2, 3, 1))


def test_reduce_expand_permute_linear():
    model = f64(ChannelsLast())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"conv": [2, 5]})
    k = _kept(6, {2, 5})
    y = F.conv2d(x, model.conv.weight[k], model.conv.bias[k])
    y = y * y.amax((2, 3), keepdim=True)
    want = F.linear(y.permute(0, 2, 3, 1), model.fc.weight[:, k], model.fc.bias)
    torch.testing.assert_close(pruned(x), want)


class Products(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(5, 6), nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x):  # x [B, T, 5]
        s = torch.einsum("btc,bsc->bts", self.a(x), self.b(x))  # contracts the 6 channels
        return self.out(torch.softmax(s, -1) @ self.a(x))


def test_einsum_and_matmul_contract_pruned_channels():
    model = f64(Products())
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"a": [1, 4]})
    k = _kept(6, {1, 4})
    a = F.linear(x, model.a.weight[k], model.a.bias[k])
    b = F.linear(x, model.b.weight[k], model.b.bias[k])
    want = F.linear(torch.softmax(a @ b.transpose(1, 2), -1) @ a, model.out.weight[:, k],
                    model.out.bias)
    torch.testing.assert_close(pruned(x), want)


from .test_rule_table import Heads as SDPAHeads  # qkv Linear(6, 24) -> 4 heads of 2 -> sdpa


def test_sdpa_heads_by_hand():
    model = f64(SDPAHeads())
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"qkv": [2]})  # q channel 2 is in head 1 (channels 2, 3)
    heads = [0, 2, 3]
    rows = torch.tensor([p * 8 + h * 2 + d for p in range(3) for h in heads for d in range(2)])
    b, t, _ = x.shape
    qkv = F.linear(x, model.qkv.weight[rows], model.qkv.bias[rows])
    q, k, v = qkv.reshape(b, t, 3, 3, 2).permute(2, 0, 3, 1, 4).unbind(0)
    cols = torch.tensor([h * 2 + d for h in heads for d in range(2)])
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 6)
    torch.testing.assert_close(pruned(x), F.linear(o, model.proj.weight[:, cols], model.proj.bias))


class MHABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_heads_against_pytorchs_own_module():
    import copy

    model = f64(MHABlock())
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    pruner = sp.Pruner(model, x, ratio=0.5, importance="l2")
    graph = pruner.graph
    pruned_plan = None
    for g in graph.groups():
        members = {m.qualname for m in g.params}
        if "attn.in_proj_weight" in members:
            pruned_plan = sp.Plan(graph, {g.id: torch.tensor([1])})
    assert pruned_plan is not None, "heads of nn.MultiheadAttention are not a group"
    pruned = pruner.apply(pruned_plan)
    # Reference: PyTorch's own nn.MultiheadAttention with head 1's value rows zeroed: that head
    # then adds exactly nothing, which is what removing it means.
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.attn.in_proj_weight[16 + 2:16 + 4] = 0
        ref.attn.in_proj_bias[16 + 2:16 + 4] = 0
    torch.testing.assert_close(pruned(x), ref(x))
    assert pruned.get_parameter("attn.in_proj_weight").shape == (18, 8)
    assert pruned.get_submodule("attn.out_proj").in_features == 6


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.bn = nn.BatchNorm2d(6)
        self.w2 = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        y = F.conv2d(x, self.w1, None, 1, 1)
        y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)
        y = torch.stack([y, F.interpolate(y, scale_factor=1.0)], 0).sum(0)
        return F.linear(y.mean((2, 3)), self.w2)


def test_functional_conv_bn_linear_stack_interpolate():
    model = f64(Functional())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"conv2d": [0, 4]})
    k = _kept(6, {0, 4})
    bn = model.bn
    y = F.conv2d(x, model.w1[k], None, 1, 1)
    y = F.batch_norm(y, bn.running_mean[k], bn.running_var[k], bn.weight[k], bn.bias[k])
    want = F.linear((2 * y).mean((2, 3)), model.w2[:, k])
    torch.testing.assert_close(pruned(x), want)


class Misc(nn.Module):
    """type_as, F.group_norm, repeat, InstanceNorm and 1d/3d pooling on pruned channels."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 1)
        self.gn = nn.GroupNorm(4, 8)
        self.inorm = nn.InstanceNorm1d(8, affine=True)
        self.c3 = nn.Conv3d(8, 2, 1)

    def forward(self, x):  # x [B, 3, L]
        y = self.c1(x).type_as(x)
        y = F.group_norm(y.unsqueeze(-1), 4, self.gn.weight, self.gn.bias).squeeze(-1)
        y = F.max_pool1d(self.inorm(y), 2).repeat(1, 1, 2)
        return self.c3(F.avg_pool3d(y[..., None, None].repeat(1, 1, 1, 2, 2), 2))


def test_type_as_group_norm_repeat_instance_norm_pooling():
    model = f64(Misc())
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"c1": [2]})  # GroupNorm takes channel 3 along
    k = _kept(8, {2, 3})
    y = F.conv1d(x, model.c1.weight[k], model.c1.bias[k])
    y = F.group_norm(y.unsqueeze(-1), 3, model.gn.weight[k], model.gn.bias[k]).squeeze(-1)
    y = F.instance_norm(y, weight=model.inorm.weight[k], bias=model.inorm.bias[k])
    y = F.max_pool1d(y, 2).repeat(1, 1, 2)
    y = F.avg_pool3d(y[..., None, None].repeat(1, 1, 1, 2, 2), 2)
    torch.testing.assert_close(pruned(x), F.conv3d(y, model.c3.weight[:, k], model.c3.bias))


class FEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 6))
        self.fc = nn.Linear(6, 2)

    def forward(self, ids):
        return self.fc(torch.tanh(F.embedding(ids, self.table)))


def test_functional_embedding():
    model = FEmbed().double().eval()
    ids = torch.randint(0, 10, (2, 4))
    pruned = assert_rule(model, ids, drop={"embedding": [5]})
    k = _kept(6, {5})
    want = F.linear(torch.tanh(F.embedding(ids, model.table[:, k])), model.fc.weight[:, k],
                    model.fc.bias)
    torch.testing.assert_close(pruned(ids), want)


class LastDimSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x)[..., 2:6])


def test_slice_after_ellipsis_is_rewritten():
    model = LastDimSlice().double().eval()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"a": [0, 3]})
    k = _kept(8, {0, 3})
    y = F.linear(x, model.a.weight[k], model.a.bias[k])[..., 1:4]  # 2:6 minus 0 before, 3 inside
    torch.testing.assert_close(pruned(x), F.linear(y, model.b.weight[:, [0, 2, 3]], model.b.bias))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt-style: LayerNorm over the channels of a channels-last tensor, then an MLP."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.up, self.down = nn.Linear(6, 12), nn.Linear(12, 6)

    def forward(self, x):
        h = self.conv(x).permute(0, 2, 3, 1)
        return h + self.down(F.gelu(self.up(self.norm(h))))


def test_layer_norm_keeps_its_dim_and_the_mlp_hidden_width_goes():
    model = f64(ChannelsLastBlock())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    graph = sp.trace(model, x)
    assert any("LayerNorm" in e.reason for e in graph.frozen())  # the channels stay
    pruned = assert_rule(model, x, drop={"up": [1, 7, 8]})
    k = _kept(12, {1, 7, 8})
    h = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1).permute(0, 2, 3, 1)
    n = F.layer_norm(h, (6,), model.norm.weight, model.norm.bias, model.norm.eps)
    y = F.linear(F.gelu(F.linear(n, model.up.weight[k], model.up.bias[k])),
                 model.down.weight[:, k], model.down.bias)
    torch.testing.assert_close(pruned(x), h + y)
    assert pruned.get_submodule("norm").normalized_shape == (6,)


class SizeQueries(nn.Module):
    """Sizes read from the tensor (``x.size(0)``, ``x.shape[1]``, ``x.dim()``) follow pruning."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 9, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.reshape(h.size(0), h.shape[1] * (h.dim() + 5), -1).flatten(1))


def test_shape_queries_read_the_pruned_sizes():
    model = f64(SizeQueries())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"conv": [2, 5]})
    k = _kept(8, {2, 5})
    h = F.conv2d(x, model.conv.weight[k], model.conv.bias[k])  # [2, 6, 3, 3]
    cols = torch.tensor([c * 9 + j for c in k.tolist() for j in range(9)])
    want = F.linear(h.flatten(1), model.fc.weight[:, cols], model.fc.bias)
    torch.testing.assert_close(pruned(x), want)


class _EmptyCacheCat(nn.Module):
    """A key/value cache's first update: ``cat([empty, k], dim=1)`` with a 1-D empty tensor,
    which torch's cat skips."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("past", torch.tensor([], dtype=torch.float64))

    def forward(self, x):
        k = torch.cat([self.past, F.relu(self.a(x))], dim=-1)
        return self.b(k)


def test_cat_skips_a_one_dimensional_empty_tensor():
    m, x = f64(_EmptyCacheCat()), torch.randn(2, 5, 4, dtype=torch.float64)
    pruned = assert_rule(m, x, drop={"a": [0, 5]})
    keep = [i for i in range(8) if i not in (0, 5)]
    want = F.linear(F.relu(F.linear(x, m.a.weight[keep], m.a.bias[keep])), m.b.weight[:, keep],
                    m.b.bias)
    torch.testing.assert_close(pruned(x), want)


class SplitAttention(nn.Module):
    """ResNeSt's split attention in plain torch: a grouped conv (2 groups = radix) whose 2C
    outputs are viewed as (radix, C), summed over the radix for a gate, and gated per radix."""

    def __init__(self, c_in=6, c=8, radix=2):
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(c_in, c * radix, 3, padding=1, groups=radix)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c * radix, 1)

    def forward(self, x):
        x = self.conv(x).relu()
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        gap = x.sum(1).mean((2, 3), keepdim=True)
        attn = self.fc2(self.fc1(gap).relu()).view(b, 1, self.radix, -1).transpose(1, 2)
        attn = attn.softmax(1).reshape(b, -1).view(b, self.radix, -1, 1, 1)
        return (x * attn).sum(1)


def test_grouped_conv_drops_a_position_in_every_group():
    """A grouped conv with few wide groups is pruned by position within the groups: ResNeSt's
    split attention keeps its 2 groups (the radix) and narrows C, with the (radix, C) views of
    the gate following (before, its channels merged into one unit and nothing was pruned)."""
    model = f64(nn.Sequential(nn.Conv2d(3, 6, 1), SplitAttention(), nn.Conv2d(8, 2, 1)))
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    graph = sp.trace(model, x)
    conv_out = next(g for g in graph.groups() if {"1.conv.weight", "1.fc1.weight"}
                    <= {m.qualname for m in g.params})
    assert conv_out.num_units == 8 and conv_out.width == 2  # C: one channel of both groups
    pruned = assert_rule(model, x, drop={"1.conv": [3], "0": [1]})  # C index 3; input position 1
    keep_c = torch.tensor([0, 1, 2, 4, 5, 6, 7])
    keep_out = torch.cat([keep_c, keep_c + 8])
    keep_in = torch.tensor([0, 2, 3, 5])  # position 1 of the 2 groups of 3 inputs: 1 and 4
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), SplitAttention(4, 7), nn.Conv2d(7, 2, 1))
    copy_sliced(ref.double().eval(), model, {
        "0.weight": (0, keep_in), "0.bias": (0, keep_in),
        "1.conv.weight": [(0, keep_out), (1, torch.tensor([0, 2]))], "1.conv.bias": (0, keep_out),
        "1.fc1.weight": (1, keep_c), "1.fc2.weight": (0, keep_out), "1.fc2.bias": (0, keep_out),
        "2.weight": (1, keep_c)})
    torch.testing.assert_close(pruned(x), ref(x))
    assert pruned.get_submodule("1.conv").groups == 2
    assert pruned.get_submodule("1.conv").in_channels == 4


def test_grouped_conv_transpose_drops_a_position_in_every_group():
    model = f64(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2),
                              nn.Conv2d(8, 2, 1)))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    pruned = assert_rule(model, x, drop={"0": [1]})  # input position 1 of both groups: 1 and 5
    keep = torch.tensor([0, 2, 3, 4, 6, 7])
    ref = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ConvTranspose2d(6, 8, 2, stride=2, groups=2),
                        nn.Conv2d(8, 2, 1))
    copy_sliced(ref.double().eval(), model, {"0.weight": (0, keep), "0.bias": (0, keep),
                                            "1.weight": (0, keep)})
    torch.testing.assert_close(pruned(x), ref(x))
    assert pruned.get_submodule("1").groups == 2 and pruned.get_submodule("1").in_channels == 6
