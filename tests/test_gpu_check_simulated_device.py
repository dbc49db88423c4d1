"""tests/simulated_cuda.py, the device benchmarks/gpu_check.py --simulate runs on: a deep copy
lives where its source does (a copied CUDA tensor is still CUDA, and still refuses numpy)."""
import copy

import pytest
import torch

from tests.simulated_cuda import DeviceMismatchError, simulated_cuda


def test_a_deep_copied_cuda_tensor_keeps_its_device():
    with simulated_cuda():
        t = torch.arange(6.0, device="cuda")
        c = copy.deepcopy(t)
        assert c.device == torch.device("cuda", 0) and c is not t
        with pytest.raises(DeviceMismatchError, match="numpy"):
            c.numpy()
        assert torch.equal(c.cpu(), torch.arange(6.0))
        host = copy.deepcopy(torch.arange(3.0))
        assert host.device.type == "cpu" and host.numpy().tolist() == [0.0, 1.0, 2.0]


def test_a_deep_copied_module_and_gradient_keep_their_device():
    with simulated_cuda():
        net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).cuda()
        net(torch.randn(4, 3, device="cuda")).sum().backward()
        twin = copy.deepcopy(net)
        for name, tensor in [*twin.named_parameters(), *twin.named_buffers()]:
            assert tensor.device.type == "cuda", name
        leaf = torch.ones(3, device="cuda", requires_grad=True)
        (2 * leaf).sum().backward()
        twin_leaf = copy.deepcopy(leaf)  # a tensor's deep copy copies its gradient too
        assert twin_leaf.grad is not None and twin_leaf.grad.device.type == "cuda"
        with pytest.raises(DeviceMismatchError):
            twin[0].weight.detach().numpy()
        with pytest.raises(DeviceMismatchError, match="same device"):
            twin(torch.randn(4, 3))  # a CPU batch into the copied CUDA model
