# The 8 engine steps started by the orchestrator's task on node 0 (PORT: a free port chosen on node 0 when the job starts, one per instance):
# instance 0 of 8, GPU 0 of node 0:
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 --mpi=pmix env CUDA_VISIBLE_DEVICES=0 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 0 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=0 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# instance 1 of 8, GPU 1 of node 0:
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 --mpi=pmix env CUDA_VISIBLE_DEVICES=1 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 1 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=1 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# instance 2 of 8, GPU 2 of node 0:
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 --mpi=pmix env CUDA_VISIBLE_DEVICES=2 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 2 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=2 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# instance 3 of 8, GPU 3 of node 0:
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 --mpi=pmix env CUDA_VISIBLE_DEVICES=3 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 3 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=3 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# instance 4 of 8, GPU 4 of node 0:
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 --mpi=pmix env CUDA_VISIBLE_DEVICES=4 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 4 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=4 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# instance 5 of 8, GPU 5 of node 0:
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 --mpi=pmix env CUDA_VISIBLE_DEVICES=5 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 5 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=5 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# instance 6 of 8, GPU 6 of node 0:
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 --mpi=pmix env CUDA_VISIBLE_DEVICES=6 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 6 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=6 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# instance 7 of 8, GPU 7 of node 0:
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 --mpi=pmix env CUDA_VISIBLE_DEVICES=7 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 7 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=7 trtllm-llmapi-launch trtllm-serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --backend pytorch --tp_size 1 --pp_size 1 --max_seq_len 4096
