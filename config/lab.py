# A lab for a class hour: the needle task with documents of up to 48 characters, on which both
# SISA and the Transformer learn to retrieve within 2,000 steps (one run: 2.5 to 4 minutes on 2 CPU cores).
# First: python prepare_data.py --doc_len=48 --name=needle48
# Then:  python train.py config/lab.py     (add --attention=softmax --out_dir=out-lab-softmax for the Transformer)
#        python compare.py config/lab.py --seeds=5 --jobs=2 --out_dir=out-lab-compare
dataset = 'needle48'
block_size = 48
max_iters = 2000
eval_interval = 100
out_dir = 'out-lab'
