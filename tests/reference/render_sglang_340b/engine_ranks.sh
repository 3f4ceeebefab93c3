# The engine step started by the orchestrator's task on node 0 (PORT: a free port chosen on node 0 when the job starts; MASTER_ADDR: node 0's hostname; MASTER_PORT: a free port on node 0):
srun --overlap --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=8 --mem=0 --distribution=block --kill-on-bad-exit=1 bash -c 'case "${SLURM_NODEID:-0}" in
  0) exec python3 -m sglang.launch_server --model-path /models/Nemotron-4-340B-Instruct-hf --host 127.0.0.1 --port "$PORT" --served-model-name nemotron4_340b_instruct --tp-size 8 --pp-size 2 --context-length 4096 --dtype bfloat16 --nnodes 2 --node-rank 0 --dist-init-addr "$MASTER_ADDR":"$MASTER_PORT" ;;
  1) exec python3 -m sglang.launch_server --model-path /models/Nemotron-4-340B-Instruct-hf --host 127.0.0.1 --port "$PORT" --served-model-name nemotron4_340b_instruct --tp-size 8 --pp-size 2 --context-length 4096 --dtype bfloat16 --nnodes 2 --node-rank 1 --dist-init-addr "$MASTER_ADDR":"$MASTER_PORT" ;;
  *) echo "engine step: unexpected SLURM_NODEID=$SLURM_NODEID" >&2; exit 2 ;;
esac'

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, 8 GPU(s) (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=2 python3 -m sglang.launch_server --model-path /models/Nemotron-4-340B-Instruct-hf --host 127.0.0.1 --port "$PORT" --served-model-name nemotron4_340b_instruct --tp-size 8 --pp-size 2 --context-length 4096 --dtype bfloat16 --nnodes 2 --node-rank 0 --dist-init-addr "$MASTER_ADDR":"$MASTER_PORT"
# rank 1 on node 1, 8 GPU(s) (worker)
SLURM_PROCID=1 SLURM_LOCALID=0 SLURM_NODEID=1 SLURM_NTASKS=2 python3 -m sglang.launch_server --model-path /models/Nemotron-4-340B-Instruct-hf --host 127.0.0.1 --port "$PORT" --served-model-name nemotron4_340b_instruct --tp-size 8 --pp-size 2 --context-length 4096 --dtype bfloat16 --nnodes 2 --node-rank 1 --dist-init-addr "$MASTER_ADDR":"$MASTER_PORT"
