# Associative recall, the smallest setting: key-value pairs then the keys again, answered from
# context (dataset.py). With 64 tokens both models learn it within 1,500 steps on a laptop CPU;
# with a larger vocabulary they sit on a plateau (the default 4,096: no model left it in 10,000
# steps on a GPU; docs/results.md). --short_conv=3 (a convolution before each attention, as in
# Zoology's recall models) takes both past it: with --recall_vocab=4096 --learning_rate=3e-3,
# 99% at 64 tokens by step 750 on the CPU (--block_size=128), at up to 1,024 by 1,250 on a GPU.
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
