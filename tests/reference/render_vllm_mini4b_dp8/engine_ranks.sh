# The engine step started by the orchestrator's task on node 0 (PORT: a free port chosen on node 0 when the job starts):
srun --overlap --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=8 --mem=0 --distribution=block --kill-on-bad-exit=1 vllm serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --served-model-name nemotron_mini_4b_instruct --tensor-parallel-size 1 --pipeline-parallel-size 1 --max-model-len 4096 --dtype bfloat16 --data-parallel-size 8

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, 8 GPU(s) (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 vllm serve /models/Nemotron-Mini-4B-Instruct --host 127.0.0.1 --port "$PORT" --served-model-name nemotron_mini_4b_instruct --tensor-parallel-size 1 --pipeline-parallel-size 1 --max-model-len 4096 --dtype bfloat16 --data-parallel-size 8
