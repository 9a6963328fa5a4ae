# nanoGPT's tiny Shakespeare model, character level: 6 layers x 384, 6 heads, block 256, batch 64,
# dropout 0.2, with the learning rates, beta2 and weight decay of nanoGPT's own config for it. A GPU's
# run (2 minutes on an H200): on 2 CPU cores a step takes about 9 s, and config/shakespeare_char_cpu.py
# is the CPU's.
# First: python prepare_data.py --dataset=shakespeare_char
# Then:  python train.py config/shakespeare_char.py     (add --attention=softmax --out_dir=out-shakespeare-softmax)
#        python sample.py --out_dir=out-shakespeare
dataset = 'shakespeare_char'
out_dir = 'out-shakespeare'
block_size = 256
batch_size = 64
n_layer = 6
n_head = 6
n_embd = 384
d_state = 16  # bench.py --shape=tiny's
dropout = 0.2
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
weight_decay = 0.1
max_iters = 5000
eval_interval = 250
always_save_checkpoint = False  # both models overfit long before step 5000: keep the best val's weights
