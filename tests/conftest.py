import torch as th

# Two cores: keep intra-op threads bounded so that tests behave the same everywhere
th.set_num_threads(2)
