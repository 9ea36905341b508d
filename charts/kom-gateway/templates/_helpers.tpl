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
{{- define "kom-gateway.config" -}}
listen:
  address: "0.0.0.0:{{ .Values.service.targetPort }}"
  {{- if .Values.tls.servingSecretName }}
  tls:
    certFile: /etc/kom-gateway/serving/tls.crt
    keyFile: /etc/kom-gateway/serving/tls.key
    {{- if .Values.tls.clientCASecretName }}
    clientCAFile: /etc/kom-gateway/client-ca/ca.crt
    {{- end }}
  {{- end }}
admin:
  address: "0.0.0.0:{{ .Values.admin.port }}"
{{- if or .Values.tls.upstreamCASecretName .Values.tls.frontProxySecretName }}
upstream:
  tls:
    {{- if .Values.tls.upstreamCASecretName }}
    caFile: /etc/kom-gateway/upstream-ca/ca.crt
    {{- end }}
    {{- if .Values.tls.frontProxySecretName }}
    certFile: /etc/kom-gateway/front-proxy/tls.crt
    keyFile: /etc/kom-gateway/front-proxy/tls.key
    {{- end }}
{{- end }}
{{ toYaml .Values.config }}
{{- end -}}
