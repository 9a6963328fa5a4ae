# Associative recall, the smallest setting: key-value pairs then the keys again, answered from
# context (dataset.py). With 64 tokens both models learn it within 1,500 steps on a laptop CPU;
# with more tokens they take far longer (the default 4,096: no model left the plateau in 10,000
# steps on a GPU; docs/results.md). --short_conv=3 (a convolution before each attention, as in
# Zoology's recall models) took both models past that plateau at 256 tokens on the CPU.
# python train.py config/recall.py     (add --attention=softmax --out_dir=out-recall-softmax)
# python compare.py config/recall.py --jobs=2 --out_dir=out-recall-compare
dataset = 'recall'
recall_vocab = 64
block_size = 64
n_layer = 2
n_embd = 128
n_head = 4
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 1500
eval_interval = 100
eval_iters = 4
out_dir = 'out-recall'
