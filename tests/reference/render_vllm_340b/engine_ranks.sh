# The engine step started by the orchestrator's task on node 0 (PORT: a free port chosen on node 0 when the job starts; MASTER_ADDR: node 0's hostname; MASTER_PORT: a free port on node 0):
srun --overlap --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=8 --mem=0 --distribution=block --kill-on-bad-exit=1 bash -c 'case "${SLURM_NODEID:-0}" in
  0) exec vllm serve /models/Nemotron-4-340B-Instruct-hf --host 127.0.0.1 --port "$PORT" --served-model-name nemotron4_340b_instruct --tensor-parallel-size 8 --pipeline-parallel-size 2 --max-model-len 4096 --dtype bfloat16 --nnodes 2 --node-rank 0 --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" ;;
  1) exec vllm serve /models/Nemotron-4-340B-Instruct-hf --host 127.0.0.1 --port "$PORT" --served-model-name nemotron4_340b_instruct --tensor-parallel-size 8 --pipeline-parallel-size 2 --max-model-len 4096 --dtype bfloat16 --nnodes 2 --node-rank 1 --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --headless ;;
  *) echo "engine step: unexpected SLURM_NODEID=$SLURM_NODEID" >&2; exit 2 ;;
esac'

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, 8 GPU(s) (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=2 vllm serve /models/Nemotron-4-340B-Instruct-hf --host 127.0.0.1 --port "$PORT" --served-model-name nemotron4_340b_instruct --tensor-parallel-size 8 --pipeline-parallel-size 2 --max-model-len 4096 --dtype bfloat16 --nnodes 2 --node-rank 0 --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
# rank 1 on node 1, 8 GPU(s) (worker)
SLURM_PROCID=1 SLURM_LOCALID=0 SLURM_NODEID=1 SLURM_NTASKS=2 vllm serve /models/Nemotron-4-340B-Instruct-hf --host 127.0.0.1 --port "$PORT" --served-model-name nemotron4_340b_instruct --tensor-parallel-size 8 --pipeline-parallel-size 2 --max-model-len 4096 --dtype bfloat16 --nnodes 2 --node-rank 1 --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --headless
