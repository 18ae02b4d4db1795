import pytest
import torch

from ressl import EmbeddingQueue


def test_starts_with_unit_vectors():
    q = EmbeddingQueue(16, 8)
    assert q.queue.shape == (16, 8)
    torch.testing.assert_close(q.queue.norm(dim=1), torch.ones(16))
    assert int(q.pointer) == 0


def test_first_in_first_out_with_wrap_around():
    q = EmbeddingQueue(6, 2)
    batches = [torch.tensor([[i, 0.1], [i + 0.5, 0.1]]) for i in range(1, 6)]  # rows apart within a batch too
    for b in batches[:3]:
        q.push(b)
    assert q.queue[:, 0].tolist() == [1, 1.5, 2, 2.5, 3, 3.5] and int(q.pointer) == 0
    q.push(batches[3])  # wraps: the oldest rows (batch 1) are overwritten first, in the batch's order
    assert q.queue[:, 0].tolist() == [4, 4.5, 2, 2.5, 3, 3.5] and int(q.pointer) == 2
    q.push(batches[4])
    assert q.queue[:, 0].tolist() == [4, 4.5, 5, 5.5, 3, 3.5] and int(q.pointer) == 4


def test_refuses_batch_that_does_not_divide_k():
    q = EmbeddingQueue(10, 2)
    before = q.queue.clone()
    with pytest.raises(ValueError, match="not a multiple"):
        q.push(torch.zeros(3, 2))
    torch.testing.assert_close(q.queue, before)


def test_state_dict_round_trip():
    q = EmbeddingQueue(8, 4)
    q.push(torch.ones(4, 4))
    r = EmbeddingQueue(8, 4)
    r.load_state_dict(q.state_dict())
    torch.testing.assert_close(r.queue, q.queue)
    assert int(r.pointer) == 4
    assert set(q.state_dict()) == {"queue", "pointer"}
