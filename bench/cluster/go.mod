module kom-gateway/bench/cluster

go 1.19
