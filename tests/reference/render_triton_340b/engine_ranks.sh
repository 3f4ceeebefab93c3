# The engine step started by the orchestrator's task on node 0 (PORT: a free port chosen on node 0 when the job starts):
srun --overlap --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=8 --mem=0 --distribution=block --kill-on-bad-exit=1 python3 /opt/NeMo/scripts/deploy/nlp/deploy_triton.py --nemo_checkpoint /models/Nemotron-4-340B-Instruct.nemo --model_type nemotron --triton_model_name nemotron4_340b_instruct --triton_http_address 127.0.0.1 --triton_port "$PORT" --num_gpus 8 --tensor_parallelism_size 8 --max_input_len 3072 --max_output_len 1024 --max_batch_size 1

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, 8 GPU(s) (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 python3 /opt/NeMo/scripts/deploy/nlp/deploy_triton.py --nemo_checkpoint /models/Nemotron-4-340B-Instruct.nemo --model_type nemotron --triton_model_name nemotron4_340b_instruct --triton_http_address 127.0.0.1 --triton_port "$PORT" --num_gpus 8 --tensor_parallelism_size 8 --max_input_len 3072 --max_output_len 1024 --max_batch_size 1
