{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "kom-gateway.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name of every object. */}}
{{- define "kom-gateway.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kom-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kom-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kom-gateway.labels" -}}
{{ include "kom-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The routing config file: listen, admin and upstream.tls from the values, the rest
     from .Values.config. */}}
{{- /*
The routing config: .Values.config with what the chart owns merged over it (listen and
admin addresses, and the TLS file paths its Secrets are mounted at). Any other key of any
section, upstream.tls.serverName included, comes from .Values.config as written.
*/ -}}
{{- define "kom-gateway.config" -}}
{{- $listen := dict "address" (printf "0.0.0.0:%v" .Values.service.targetPort) -}}
{{- if .Values.tls.servingSecretName -}}
{{- $serving := dict "certFile" "/etc/kom-gateway/serving/tls.crt" "keyFile" "/etc/kom-gateway/serving/tls.key" -}}
{{- if .Values.tls.clientCASecretName -}}
{{- $_ := set $serving "clientCAFile" "/etc/kom-gateway/client-ca/ca.crt" -}}
{{- end -}}
{{- $_ := set $serving "sessionTickets" (int .Values.tls.sessionTickets) -}}
{{- $_ := set $listen "tls" $serving -}}
{{- end -}}
{{- $managed := dict "listen" $listen "admin" (dict "address" (printf "0.0.0.0:%v" .Values.admin.port)) -}}
{{- $files := dict -}}
{{- if .Values.tls.upstreamCASecretName -}}
{{- $_ := set $files "caFile" "/etc/kom-gateway/upstream-ca/ca.crt" -}}
{{- end -}}
{{- if .Values.tls.frontProxySecretName -}}
{{- $_ := set $files "certFile" "/etc/kom-gateway/front-proxy/tls.crt" -}}
{{- $_ := set $files "keyFile" "/etc/kom-gateway/front-proxy/tls.key" -}}
{{- end -}}
{{- if $files -}}
{{- $_ := set $managed "upstream" (dict "tls" $files) -}}
{{- end -}}
{{- toYaml (mergeOverwrite (deepCopy .Values.config) $managed) -}}
{{- end -}}
