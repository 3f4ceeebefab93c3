# The 8 engine steps started by the orchestrator's task on node 0 (PORT: a free port chosen on node 0 when the job starts, one per instance; MASTER_PORT: a free port, one per instance):
# instance 0 of 8, GPU 0 of node 0:
# environment of the engine tasks: MASTER_PORT="$MASTER_PORT"
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 env CUDA_VISIBLE_DEVICES=0 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 0 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=0 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# instance 1 of 8, GPU 1 of node 0:
# environment of the engine tasks: MASTER_PORT="$MASTER_PORT"
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 env CUDA_VISIBLE_DEVICES=1 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 1 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=1 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# instance 2 of 8, GPU 2 of node 0:
# environment of the engine tasks: MASTER_PORT="$MASTER_PORT"
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 env CUDA_VISIBLE_DEVICES=2 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 2 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=2 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# instance 3 of 8, GPU 3 of node 0:
# environment of the engine tasks: MASTER_PORT="$MASTER_PORT"
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 env CUDA_VISIBLE_DEVICES=3 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 3 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=3 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# instance 4 of 8, GPU 4 of node 0:
# environment of the engine tasks: MASTER_PORT="$MASTER_PORT"
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 env CUDA_VISIBLE_DEVICES=4 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 4 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=4 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# instance 5 of 8, GPU 5 of node 0:
# environment of the engine tasks: MASTER_PORT="$MASTER_PORT"
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 env CUDA_VISIBLE_DEVICES=5 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 5 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=5 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# instance 6 of 8, GPU 6 of node 0:
# environment of the engine tasks: MASTER_PORT="$MASTER_PORT"
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 env CUDA_VISIBLE_DEVICES=6 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 6 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=6 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# instance 7 of 8, GPU 7 of node 0:
# environment of the engine tasks: MASTER_PORT="$MASTER_PORT"
srun --overlap --relative=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 env CUDA_VISIBLE_DEVICES=7 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 7 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 env CUDA_VISIBLE_DEVICES=7 python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/models/Nemotron-Mini-4B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True tensor_model_parallel_size=1 pipeline_model_parallel_size=1 trainer.precision=bf16 trainer.devices=1 trainer.num_nodes=1 web_server=False port="$PORT"
