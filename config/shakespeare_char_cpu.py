# Tiny Shakespeare on a CPU: 4 layers x 128, block 128, 1,000 steps, 7 to 23 minutes on 2 cores by
# the machine (val loss 1.60; docs/results.md). config/shakespeare_char.py is nanoGPT's larger model,
# for a GPU.
# First: python prepare_data.py --dataset=shakespeare_char
# Then:  python train.py config/shakespeare_char_cpu.py     (add --attention=softmax --out_dir=out-shakespeare-softmax)
#        python sample.py --out_dir=out-shakespeare
dataset = 'shakespeare_char'
out_dir = 'out-shakespeare'
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
d_state = 16
max_iters = 1000
eval_interval = 250
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1  # nanoGPT's, as config/shakespeare_char.py
always_save_checkpoint = False  # as config/shakespeare_char.py: keep the best val's weights
